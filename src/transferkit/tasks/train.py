"""The train task: data, model and trainer from config; fit; evaluate the best checkpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from transferkit.checkpoints import load_model
from transferkit.errors import ConfigError
from transferkit.features import use_feature_cache
from transferkit.features.precision import resolve_precision
from transferkit.lr_finder import tune_lr
from transferkit.tasks.common import (
    build,
    build_model,
    check_same_classes,
    instantiate_group,
    plain,
    print_config_tree,
    print_results,
    recorded_data_config,
    user_errors_exit,
    write_json,
)

log = logging.getLogger("transferkit")


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def _check_run(cfg: DictConfig, has_test: bool) -> None:
    """Refuse, before any work, what would only fail at the end."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist.")
    if not cfg.get("train", True) and not ckpt_path:
        raise ConfigError("train=false evaluates a checkpoint: give it with ckpt_path=PATH.")
    metric = cfg.get("optimized_metric")
    if metric and not (metric.startswith("val/") or (metric.startswith("test/") and has_test)):
        where = "val/... or test/..." if has_test else "val/... (the data has no test/)"
        raise ConfigError(f"optimized_metric={metric} will not be measured; use {where}, e.g. val/acc.")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then measure the best checkpoint on val (and test when the data has it).

    With `train=false`, the model is the one in `ckpt_path`, with its own preprocessing.
    Returns what results.json holds.
    """
    started = time.perf_counter()
    print_config_tree(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data)
    datamodule.prepare_data()
    _check_run(cfg, datamodule.has_test)
    if cfg.get("train", True):
        model = build_model(
            cfg, datamodule.class_names, datamodule.preprocessing_overrides, datamodule.class_weights()
        )
        model.data_config = recorded_data_config(cfg.data, datamodule)
    else:
        model = load_model(cfg.ckpt_path)
        check_same_classes(model, datamodule.class_names)
    datamodule.preprocessing = model.preprocessing
    log.info("%d classes: %s", len(model.class_names), ", ".join(model.class_names))

    finetune = build(cfg.finetune)
    callbacks = [finetune, *instantiate_group(cfg.get("callbacks"))]  # unfreeze before lr logging
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")))

    best = None  # None: validate the model as it is (the checkpoint's, with train=false)
    features = dict(plain(cfg.get("features")) or {})
    model.frozen_dtype = resolve_precision(features.pop("precision", "auto"), trainer.strategy.root_device)
    feature_cache = None
    if cfg.get("train", True):
        finetune.freeze_before_training(model)  # what trains decides whether features can be cached
        feature_cache = use_feature_cache(
            model, datamodule, trainer, finetune, seed=cfg.get("seed"), **features
        )
        if cfg.get("tune_lr"):  # Lightning sweeps without our callbacks: the model is frozen above
            tune_lr(trainer, model, datamodule, cfg.paths.output_dir, **plain(cfg.get("lr_finder")) or {})
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    evaluated = best or (None if cfg.get("train", True) else cfg.ckpt_path)
    validated = trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    if not validated:
        raise ConfigError("Nothing was validated; check trainer.limit_val_batches and the val split.")
    results: dict[str, Any] = _metrics(validated[0])
    if cfg.get("test", True) and datamodule.has_test:
        results.update(_metrics(trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]))
    results.update(
        best_model_path=str(Path(evaluated).resolve()) if evaluated else None,
        class_names=model.class_names,
        feature_cache=str(feature_cache) if feature_cache else None,
        epochs=trainer.current_epoch,
        wall_s=round(time.perf_counter() - started, 2),
    )
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        write_json(output_dir / "results.json", results)
        print_results(f"Results ({output_dir})", results)
    return results


@user_errors_exit
def main(cfg: DictConfig) -> float:
    """Hydra entry: train, then hand sweepers the metric named by `optimized_metric`."""
    results = train(cfg)
    metric = cfg.get("optimized_metric")
    if metric and metric not in results:
        numeric = [k for k, v in results.items() if isinstance(v, float)]
        raise ConfigError(f"optimized_metric={metric} was not measured; choose one of: {', '.join(numeric)}.")
    return results[metric] if metric else None

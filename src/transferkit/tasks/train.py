"""The train task: data, model and trainer from config; fit; evaluate the best checkpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from transferkit.errors import ConfigError
from transferkit.tasks.common import (
    build,
    build_model,
    instantiate_group,
    print_config_tree,
    print_results,
    user_errors_exit,
    write_json,
)

log = logging.getLogger("transferkit")


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then measure the best checkpoint on val (and test when the data has it).

    Returns what results.json holds.
    """
    started = time.perf_counter()
    print_config_tree(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data)
    datamodule.prepare_data()
    model = build_model(cfg, datamodule.class_names, datamodule.preprocessing_overrides)
    datamodule.preprocessing = model.preprocessing
    log.info("%d classes: %s", len(model.class_names), ", ".join(model.class_names))

    callbacks = [*instantiate_group(cfg.get("callbacks")), build(cfg.finetune)]
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")))

    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    else:
        best = cfg.get("ckpt_path")
    results: dict[str, Any] = _metrics(
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    )
    if cfg.get("test", True) and datamodule.has_test:
        results.update(_metrics(trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]))
    results.update(
        best_model_path=str(Path(best).resolve()) if best else None,
        class_names=model.class_names,
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

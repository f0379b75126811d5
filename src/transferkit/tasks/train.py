"""The train task: data, model and trainer from config; fit; evaluate the best checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from transferkit import reports
from transferkit.checkpoints import load_model, recorded_seed, resume_differences
from transferkit.data.images import ImageListDataset
from transferkit.data.sampling import EpochSampler
from transferkit.errors import ConfigError
from transferkit.features import training_augment, use_feature_cache
from transferkit.features.cache import weights_fingerprint
from transferkit.features.precision import resolve_precision
from transferkit.lr_finder import tune_lr
from transferkit.module import TransferModule
from transferkit.plots import plot_batch, plot_curves
from transferkit.rng import draw_seed
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


def resolve_checkpoint(cfg: DictConfig) -> None:
    """Make `ckpt_path` a file, and continue a run in its own directory.

    `last` is checkpoints/last.ckpt of this run directory (with hydra.run.dir=<run>), else of the
    newest run under logs/<task>/runs. Training from a checkpoint inside a run directory writes
    there (checkpoints, metrics, results.json), so a resumed run stays one run.
    """
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return
    if ckpt_path == "last":
        own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
        found = [own] if own.is_file() else sorted(runs.glob("*/checkpoints/last.ckpt"), key=os.path.getmtime)
        if not found:
            raise ConfigError(f"ckpt_path=last: no run in {runs} has checkpoints/last.ckpt; give a path.")
        ckpt_path = str(found[-1])
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist.")
    run_dir = path.resolve().parent.parent
    with open_dict(cfg):
        cfg.ckpt_path = str(path)
        if cfg.get("train", True) and path.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
            if run_dir != Path(cfg.paths.output_dir).resolve():
                move_into_run(Path(cfg.paths.output_dir), run_dir)
            cfg.paths.output_dir = str(run_dir)


def move_into_run(new_dir: Path, run_dir: Path) -> None:
    """Fold the directory Hydra made for this invocation into the resumed run: its config goes
    to .hydra/resumed_<name>/, its log is appended to the run's log."""
    log.info("Resuming %s: its checkpoints, metrics and results are updated in place.", run_dir)
    if (new_dir / ".hydra").is_dir():
        shutil.move(str(new_dir / ".hydra"), run_dir / ".hydra" / f"resumed_{new_dir.name}")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == new_dir:
            handler.close()
            old_log = Path(handler.baseFilename)
            handler.baseFilename = str(run_dir / old_log.name)
            handler.mode = "a"
            with open(handler.baseFilename, "a") as f:
                f.write(old_log.read_text())
            old_log.unlink()
    if new_dir.is_dir() and not any(new_dir.iterdir()):
        new_dir.rmdir()


def resolve_seed(cfg: DictConfig) -> None:
    """Give the run a seed that can be read again: the split of val off train/, the epoch order
    and the augmentation are functions of it, so eval and a resume must draw the same.

    `seed=null` draws one (logged, and recorded in checkpoints and results.json); a run from a
    checkpoint takes the checkpoint's, so a resume continues on the split it started on.
    """
    seed = cfg.get("seed")
    recorded = recorded_seed(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if recorded is not None and recorded != seed:
        if seed is not None:
            log.info(
                "Using the checkpoint's seed=%d, not seed=%s: its split and order go on.", recorded, seed
            )
        seed = recorded
    if seed is None:
        seed = draw_seed()
        log.info("seed=null: this run's seed is %d (recorded in its checkpoints and results.json).", seed)
    with open_dict(cfg):
        cfg.seed = int(seed)


def check_resume(cfg: DictConfig, model: TransferModule) -> None:
    """A resume continues the run it names: refuse one whose config would train something
    else (another lr, model, image size, strategy...), which Lightning would half apply."""
    if not cfg.get("ckpt_path"):
        return
    differences = resume_differences(cfg.ckpt_path, model)
    if differences:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} continues a run set up otherwise ({'; '.join(differences)}). "
            "Resume with the run's own settings (drop those overrides), or leave out ckpt_path to start "
            "a new run (trainer.*, data.root, data.num_workers and data.batch_size may change)."
        )


def _check_run(cfg: DictConfig, has_test: bool) -> None:
    """Refuse, before any work, what would only fail at the end."""
    devices, cores = cfg.trainer.get("devices"), os.cpu_count() or 1
    if cfg.trainer.get("accelerator") == "cpu" and isinstance(devices, int) and devices > cores:
        raise ConfigError(f"trainer.devices={devices} CPU processes, but this machine has {cores} cores.")
    ckpt_path = cfg.get("ckpt_path")
    if not cfg.get("train", True) and not ckpt_path:
        raise ConfigError("train=false evaluates a checkpoint: give it with ckpt_path=PATH.")
    if cfg.get("tune_lr") and ckpt_path and cfg.get("train", True):
        raise ConfigError(
            "tune_lr=true with ckpt_path: a resume continues at the run's own lr (its optimizer is "
            "restored); drop tune_lr, or leave out ckpt_path to start a new run."
        )
    metric = cfg.get("optimized_metric")
    if metric and not (metric.startswith("val/") or (metric.startswith("test/") and has_test)):
        where = "val/... or test/..." if has_test else "val/... (the data has no test/)"
        raise ConfigError(f"optimized_metric={metric} will not be measured; use {where}, e.g. val/acc.")


@contextmanager
def loggers_muted(trainer: L.Trainer) -> Iterator[None]:
    """Per-epoch files (metrics.csv, TensorBoard) hold per-epoch numbers only: a validation of
    the best checkpoint after fit would be logged under the last epoch's number."""
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.loggers = loggers


def parameter_counts(model: TransferModule) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params/total": total, "params/trainable": trainable, "params/frozen": total - trainable}


def log_run_facts(trainer: L.Trainer, cfg: DictConfig, model: TransferModule) -> None:
    """The composed config and the parameter counts (as training starts) to every logger; the
    model's hyper-parameters reach them through Lightning."""
    counts = parameter_counts(model)
    log.info("Parameters: %s", ", ".join(f"{k.split('/')[1]} {v:,}" for k, v in counts.items()))
    for logger in trainer.loggers:
        logger.log_hyperparams({**counts, "config": plain(cfg)})


def training_batch(datamodule: Any, model: TransferModule, count: int = 16) -> tuple[torch.Tensor, list[int]]:
    """The first `count` training images of epoch 0 as the model is fed them: augmented by
    (seed, epoch, image) from the images; with cached features, the cached view each one trains
    on (the evaluation transform with one view)."""
    train = datamodule.splits.train
    keys = list(EpochSampler(len(train), datamodule.seed))[:count]
    cached = (datamodule.feature_sets or {}).get("train")
    augment = training_augment(datamodule)
    transform = model.preprocessing.transforms(train=augment is not None, augment=augment)
    dataset = ImageListDataset(train, transform, datamodule.seed)
    if cached is not None and augment is not None:  # view v of image i was drawn as key v * N + i
        keys = [cached.view(0, key) * len(train) + key for key in keys]
    images = torch.stack([dataset[key][0] for key in keys])
    return images, [train[key % len(train)][1] for key in keys]


def plot_training_batch(datamodule: Any, model: TransferModule, path: Path) -> None:
    images, labels = training_batch(datamodule, model)
    augment = training_augment(datamodule)
    title = f"Training images as the model sees them ({f'augment={augment}' if augment else 'not augmented'})"
    plot_batch(images, labels, model.class_names, model.preprocessing, path, title=title)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then measure the best checkpoint on val (and test when the data has it).

    With `train=false`, the model is the one in `ckpt_path`, with its own preprocessing.
    Returns what results.json holds.
    """
    started = time.perf_counter()
    resolve_checkpoint(cfg)
    resolve_seed(cfg)
    print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data)
    datamodule.prepare_data()
    _check_run(cfg, datamodule.has_test)
    finetune = build(cfg.finetune)
    callbacks = [finetune, *instantiate_group(cfg.get("callbacks"))]  # unfreeze before lr logging
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")))
    if cfg.get("train", True):
        model = build_model(
            cfg, datamodule.class_names, datamodule.preprocessing_overrides, datamodule.class_weights()
        )
        model.check_input_size()
        model.data_config = recorded_data_config(cfg.data, datamodule)
        model.run_record.update(seed=cfg.seed, finetune=plain(cfg.finetune))
        check_resume(cfg, model)
        finetune.freeze_before_training(model)  # what trains decides whether features can be cached
        finetune.check(trainer)
    else:
        model = load_model(cfg.ckpt_path)
        check_same_classes(model, datamodule.class_names)
    datamodule.preprocessing = model.preprocessing
    log.info("%d classes: %s", len(model.class_names), ", ".join(model.class_names))
    _ = datamodule.splits  # every image checked, now that the config is known to work
    if datamodule.bad_images and trainer.is_global_zero:
        listed = "".join(f"{path}\t{error}\n" for path, error in datamodule.bad_images.items())
        (Path(cfg.paths.output_dir) / "bad_images.txt").write_text(listed)

    best = None  # None: validate the model as it is (the checkpoint's, with train=false)
    features = dict(plain(cfg.get("features")) or {})
    model.frozen_dtype = resolve_precision(features.pop("precision", "auto"), trainer.strategy.root_device)
    feature_cache = None
    if cfg.get("train", True):
        log_run_facts(trainer, cfg, model)
        feature_cache = use_feature_cache(model, datamodule, trainer, finetune, seed=cfg.seed, **features)
        model.run_record["augment"] = training_augment(datamodule)
        if trainer.is_global_zero:
            plot_training_batch(datamodule, model, Path(cfg.paths.output_dir) / "plots" / "train_batch.png")
        if cfg.get("tune_lr"):  # Lightning sweeps without our callbacks: the model is frozen above
            tune_lr(trainer, model, datamodule, cfg.paths.output_dir, **plain(cfg.get("lr_finder")) or {})
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if trainer.world_size > 1:  # replicas must agree: DDP all-reduces every trained block
            log.info("Rank %d: weights %s", trainer.global_rank, weights_fingerprint(model))
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    evaluated = best or (None if cfg.get("train", True) else cfg.ckpt_path)
    with loggers_muted(trainer):  # the best checkpoint's numbers go to results.json and final/*
        validated = trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        if not validated:
            raise ConfigError("Nothing was validated; check trainer.limit_val_batches and the val split.")
        results: dict[str, Any] = _metrics(validated[0])
        if cfg.get("test", True) and datamodule.has_test:
            tested = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
            results.update(_metrics(tested[0]))
    results.update(
        best_model_path=str(Path(evaluated).resolve()) if evaluated else None,
        class_names=model.class_names,
        seed=cfg.seed,
        augment=model.run_record.get("augment", datamodule.augment),
        feature_cache=str(feature_cache) if feature_cache else None,
        epochs=trainer.current_epoch,
        wall_s=round(time.perf_counter() - started, 2),
    )
    if trainer.world_size > 1:
        metrics = json.dumps(_metrics(validated[0]), sort_keys=True)
        log.info("Rank %d: metrics %s", trainer.global_rank, metrics)
    for logger in trainer.loggers:  # every logger gets the final numbers, not only per-epoch ones
        final = {f"final/{k}": v for k, v in results.items() if isinstance(v, float)}
        logger.log_metrics(final, trainer.global_step)
        logger.save()
        if hasattr(logger, "close"):
            logger.close()
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        if model.history["val"]:
            plot_curves(model.history, output_dir / "plots" / "curves.png")
        if model.confusion is not None:  # of the final validation: the best checkpoint's
            reports.write_confusion_matrix(model.confusion, model.class_names, output_dir / "plots")
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

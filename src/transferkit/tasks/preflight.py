"""What a training run settles, or refuses, before any work: its seed, a resume that would train
something else, and settings that would only fail at the end."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from transferkit.errors import ConfigError
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import recorded_augment, recorded_seed, resume_differences
from transferkit.training.rng import draw_seed

log = logging.getLogger(__name__)


def check_fold_seed(cfg: DictConfig) -> None:
    """A fold is a part of the pool cut by the seed: jobs of one cross-validation (a sweep over
    data.fold) must share it, which seed=null, drawn per job, would not."""
    if cfg.data.get("fold") is not None and cfg.get("seed") is None and not cfg.get("ckpt_path"):
        raise ConfigError(
            "data.fold with seed=null: each job would draw its own seed and cut other folds, which "
            "would overlap; set seed=N for all the folds of one cross-validation."
        )


def resolve_seed(seed: int | None, ckpt_path: str | None) -> int:
    """The run's seed, one that can be read again: the split of val off train/, the epoch order
    and the augmentation are functions of it, so eval and a resume must draw the same.

    `seed=null` draws one (logged, and recorded in checkpoints and results.json); a run from a
    checkpoint takes the checkpoint's, so a resume continues on the split it started on.
    """
    recorded = recorded_seed(ckpt_path) if ckpt_path else None
    if recorded is not None and recorded != seed:
        if seed is not None:
            log.info(
                "Using the checkpoint's seed=%d, not seed=%s: its split and order go on.", recorded, seed
            )
        seed = recorded
    if seed is None:
        seed = draw_seed()
        log.info("seed=null: this run's seed is %d (recorded in its checkpoints and results.json).", seed)
    return int(seed)


def refuse_eval_only(cfg: DictConfig) -> None:
    if cfg.get("train", True) is False:
        raise ConfigError(
            "train=false is gone: evaluate a checkpoint with python eval.py ckpt_path=PATH "
            "(the same metrics, plus a per-class report and the confusion matrix)."
        )


def check_run(cfg: DictConfig, has_test: bool) -> None:
    """Refuse, before any work, what would only fail at the end."""
    devices, cores = cfg.trainer.get("devices"), os.cpu_count() or 1
    if cfg.trainer.get("accelerator") == "cpu" and isinstance(devices, int) and devices > cores:
        raise ConfigError(f"trainer.devices={devices} CPU processes, but this machine has {cores} cores.")
    if cfg.get("tune_lr") and cfg.get("ckpt_path"):
        raise ConfigError(
            "tune_lr=true with ckpt_path: a resume continues at the run's own lr (its optimizer is "
            "restored); drop tune_lr, or leave out ckpt_path to start a new run."
        )
    metric = cfg.get("optimized_metric")
    if metric and not (metric.startswith("val/") or (metric.startswith("test/") and has_test)):
        where = "val/... or test/..." if has_test else "val/... (the data has no test/)"
        raise ConfigError(f"optimized_metric={metric} will not be measured; use {where}, e.g. val/acc.")


def check_resume(cfg: DictConfig, model: TransferModule) -> None:
    """A resume continues the run it names: refuse one whose config would train something
    else (another lr, model, image size, strategy...), which Lightning would half apply."""
    if not cfg.get("ckpt_path"):
        return
    differences = resume_differences(cfg.ckpt_path, model)
    if differences:
        listed = "; ".join(f"{key}: {there!r} there, {here!r} here" for key, there, here in differences)
        ran = next((there for key, there, _ in differences if key == "features.precision (as run)"), None)
        precision = f" (for the precision: features.precision={ran})" if ran else ""
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} continues a run set up otherwise ({listed}). "
            f"Resume with the run's own settings{precision or ' (drop those overrides)'}, or leave out "
            "ckpt_path to start a new run (trainer.max_epochs, the devices, paths, data.num_workers and "
            "data.batch_size may change)."
        )


def check_resumed_augment(cfg: DictConfig, here: str | None) -> None:
    """A resume trains on what the run trained on: images under its augmentation (`here`), or
    cached views (None). The settings are compared before (`check_resume`); this compares what
    they decided here, which a smaller disk or features.max_gb can change (a cache that no
    longer fits)."""
    if not cfg.get("ckpt_path"):
        return
    recorded, there = recorded_augment(cfg.ckpt_path)
    if recorded and there != here:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} trained on {_training_data(there)}, but this run would train on "
            f"{_training_data(here)} (the feature cache was {'not ' if here is not None else ''}built "
            "here: see the Feature cache line above). Resume where the run's cache fits, with its "
            "features.max_gb, or start a new run."
        )


def _training_data(augment: str | None) -> str:
    return "cached features of one view" if augment is None else f"images under data.augment={augment}"


def optimized_value(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    """The number a sweeper optimizes: results[optimized_metric]."""
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if metric not in results:
        numeric = [k for k, v in results.items() if isinstance(v, float)]
        raise ConfigError(f"optimized_metric={metric} was not measured; choose one of: {', '.join(numeric)}.")
    return results[metric]

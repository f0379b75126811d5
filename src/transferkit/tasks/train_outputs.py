"""What a training run leaves besides checkpoints: its facts and final numbers in every logger,
the images it trains on, the curves and confusion matrix, and the images it could not read."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from transferkit import reports
from transferkit.config.build import plain
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.images import ImageListDataset
from transferkit.data.sampling import EpochSampler
from transferkit.model.module import TransferModule
from transferkit.reports.plots import plot_batch, plot_curves

log = logging.getLogger(__name__)


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


def log_final(trainer: L.Trainer, results: dict[str, Any]) -> None:
    """Every logger gets the final numbers (`final/<metric>`), not only per-epoch ones, and is closed."""
    final = {f"final/{k}": v for k, v in results.items() if isinstance(v, float)}
    for logger in trainer.loggers:
        logger.log_metrics(final, trainer.global_step)
        logger.save()
        if hasattr(logger, "close"):
            logger.close()


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


def training_batch(
    datamodule: ImageFolderDataModule, model: TransferModule, count: int = 16
) -> tuple[torch.Tensor, list[int]]:
    """The first `count` training images of epoch 0 as the model is fed them: augmented by
    (seed, epoch, image) from the images; with cached features, the cached view each one trains
    on (the evaluation transform with one view)."""
    train = datamodule.splits.train
    keys = list(EpochSampler(len(train), datamodule.seed))[:count]
    cached = (datamodule.feature_sets or {}).get("train")
    augment = datamodule.training_augment
    transform = model.preprocessing.transforms(augment is not None, augment, datamodule.crop_scale)
    dataset = ImageListDataset(train, transform, datamodule.seed)
    if cached is not None and augment is not None:  # view v of image i was drawn as key v * N + i
        keys = [cached.view(0, key) * len(train) + key for key in keys]
    images = torch.stack([dataset[key][0] for key in keys])
    return images, [train[key % len(train)][1] for key in keys]


@rank_zero_only
def plot_training_batch(datamodule: ImageFolderDataModule, model: TransferModule, path: Path) -> None:
    images, labels = training_batch(datamodule, model)
    augment = datamodule.training_augment
    title = f"Training images as the model sees them ({f'augment={augment}' if augment else 'not augmented'})"
    plot_batch(images, labels, model.class_names, model.preprocessing, path, title=title)


@rank_zero_only
def write_bad_images(datamodule: ImageFolderDataModule, output_dir: Path) -> None:
    """bad_images.txt lists the images the scan left out, and why."""
    if datamodule.bad_images:
        listed = "".join(f"{path}\t{error}\n" for path, error in datamodule.bad_images.items())
        (output_dir / "bad_images.txt").write_text(listed)


@rank_zero_only
def write_plots(model: TransferModule, output_dir: Path) -> None:
    """The learning curves, and the confusion matrix of the final validation (the best checkpoint's)."""
    if model.history["val"]:
        score = "f1_micro" if model.multilabel else "acc"
        plot_curves(model.history, output_dir / "plots" / "curves.png", score)
    if model.confusion is not None:
        reports.write_confusion_matrix(model.confusion, model.class_names, output_dir / "plots")

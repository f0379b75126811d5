"""Cached backbone features: with a frozen backbone, one forward pass over the data in total.

`features.cache=auto` (the default) caches whenever the backbone never trains in the run
(finetune=freeze with finetune.bn=frozen), no batch mixing is on and the run is on one device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from transferkit.errors import ConfigError
from transferkit.features.cache import FeatureSet, build_or_load

log = logging.getLogger("transferkit")
CACHE_MODES = ("auto", True, False)


def _why_not(finetune: L.Callback, datamodule, trainer: L.Trainer) -> str | None:
    """Why this run cannot train on cached features, or None if it can."""
    if not getattr(finetune, "backbone_always_frozen", False):
        return "the backbone trains in this run (use finetune=freeze with finetune.bn=frozen)"
    if getattr(datamodule, "batch_mix", None) is not None:
        return "MixUp/CutMix mix images, not features (set data.mixup_alpha=0 data.cutmix_alpha=0)"
    if trainer.world_size > 1:
        return "it is built by one process (use one device)"
    return None


def use_feature_cache(
    model,
    datamodule,
    trainer: L.Trainer,
    finetune: L.Callback,
    cache: str | bool = "auto",
    views: int = 1,
    dir: str | Path = ".cache/features",
    seed: int | None = None,
) -> Path | None:
    """Point `datamodule` at cached features when the run allows it; returns the cache file.

    The features are computed in `model.frozen_dtype`, the precision the run's frozen forward uses.
    """
    if cache not in CACHE_MODES:
        raise ConfigError(f"features.cache={cache!r} must be auto, true or false.")
    if int(views) < 1:
        raise ConfigError(f"features.views={views} must be 1 or more.")
    if int(views) > 1 and datamodule.augment is None:
        raise ConfigError(
            f"features.views={views} caches augmented views, but data.augment is off; use features.views=1."
        )
    if cache is False:
        return None
    reason = _why_not(finetune, datamodule, trainer)
    if reason is not None:
        if cache is True:
            raise ConfigError(f"features.cache=true cannot be used: {reason}.")
        return None
    splits = {"train": datamodule.splits.train, "val": datamodule.splits.val}
    if datamodule.splits.test is not None:
        splits["test"] = datamodule.splits.test
    preprocessing = datamodule.preprocessing
    sets, path, _ = build_or_load(
        model.backbone,
        splits,
        train_transform=preprocessing.transforms(train=True, augment=datamodule.augment),
        eval_transform=preprocessing.transforms(train=False),
        directory=dir,
        views=int(views),
        dtype=model.frozen_dtype,
        device=trainer.strategy.root_device,
        seed=seed,
        batch_size=datamodule.batch_size,
        num_workers=datamodule.num_workers,
        channels_last=model.channels_last,
    )
    sets["train"].seed = seed  # which view each epoch draws
    datamodule.use_features(sets)
    if int(views) == 1 and datamodule.augment is not None:
        log.info(
            "data.augment=%s is not applied: features are cached with 1 view (the evaluation "
            "transform); use features.views=N to cache N augmented views, or features.cache=false.",
            datamodule.augment,
        )
    return path


def training_augment(datamodule) -> str | None:
    """The augmentation training actually gets: the data's policy, or None when cached
    features of one view (the evaluation transform) replace the images."""
    cached = (datamodule.feature_sets or {}).get("train")
    if cached is not None and cached.views == 1:
        return None
    return datamodule.augment


__all__ = ["FeatureSet", "training_augment", "use_feature_cache"]

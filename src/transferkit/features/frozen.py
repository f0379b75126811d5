"""The `features` config group: how a frozen backbone's forward pass runs (its precision) and
whether its features are computed once and cached.

`cache: auto` (the default) caches whenever the backbone never trains in the run
(finetune=freeze with finetune.bn=frozen), no batch mixing is on and the run is on one device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch

from transferkit.errors import ConfigError
from transferkit.features.cache import build_or_load
from transferkit.features.precision import PRECISIONS, resolve_precision

if TYPE_CHECKING:
    from transferkit.data.datamodule import ImageFolderDataModule
    from transferkit.finetune import BlockFinetuning
    from transferkit.module import TransferModule

log = logging.getLogger(__name__)
CACHE_MODES = ("auto", True, False)


class FrozenFeatures:
    """`cache`: auto, true (refuse a run that cannot use it) or false. `views`: cached views per
    training image (1: the evaluation transform; K > 1: K augmented views, one drawn per epoch).
    `precision`: auto (bf16 where the hardware has it natively, else fp32), bf16, fp16 or fp32."""

    def __init__(
        self,
        cache: str | bool = "auto",
        views: int = 1,
        precision: str = "auto",
        dir: str | Path = ".cache/features",
    ) -> None:
        if cache not in CACHE_MODES:
            raise ConfigError(f"features.cache={cache!r} must be auto, true or false.")
        if int(views) < 1:
            raise ConfigError(f"features.views={views} must be 1 or more.")
        if precision != "auto" and precision not in PRECISIONS:
            raise ConfigError(
                f"features.precision={precision!r} is not one of: auto, {', '.join(PRECISIONS)}."
            )
        self.cache, self.views, self.precision, self.dir = cache, int(views), precision, Path(dir)

    def dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the frozen backbone runs in on `device`."""
        return resolve_precision(self.precision, device)

    def why_not(
        self, finetune: BlockFinetuning, datamodule: ImageFolderDataModule, trainer: L.Trainer
    ) -> str | None:
        """Why this run cannot train on cached features, or None if it can."""
        if not finetune.backbone_always_frozen:
            return "the backbone trains in this run (use finetune=freeze with finetune.bn=frozen)"
        if datamodule.batch_mix is not None:
            return "MixUp/CutMix mix images, not features (set data.mixup_alpha=0 data.cutmix_alpha=0)"
        if trainer.world_size > 1:
            return "it is built by one process (use one device)"
        return None

    def use(
        self,
        model: TransferModule,
        datamodule: ImageFolderDataModule,
        trainer: L.Trainer,
        finetune: BlockFinetuning,
        seed: int | None = None,
    ) -> Path | None:
        """Point `datamodule` at cached features when the run allows it; returns the cache file.
        The features are computed in `model.frozen_dtype`, the precision the frozen forward uses."""
        if self.views > 1 and datamodule.augment is None:
            raise ConfigError(
                f"features.views={self.views} caches augmented views, but data.augment is off; "
                "use features.views=1."
            )
        if self.cache is False:
            return None
        reason = self.why_not(finetune, datamodule, trainer)
        if reason is not None:
            if self.cache is True:
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
            directory=self.dir,
            views=self.views,
            dtype=model.frozen_dtype,
            device=trainer.strategy.root_device,
            seed=seed,
            batch_size=datamodule.batch_size,
            num_workers=datamodule.num_workers,
            channels_last=model.channels_last,
        )
        sets["train"].seed = seed  # which view each epoch draws
        datamodule.use_features(sets)
        if self.views == 1 and datamodule.augment is not None:
            log.info(
                "data.augment=%s is not applied: features are cached with 1 view (the evaluation "
                "transform); use features.views=N to cache N augmented views, or features.cache=false.",
                datamodule.augment,
            )
        return path


def training_augment(datamodule: ImageFolderDataModule) -> str | None:
    """The augmentation training actually gets: the data's policy, or None when cached
    features of one view (the evaluation transform) replace the images."""
    cached = (datamodule.feature_sets or {}).get("train")
    if cached is not None and cached.views == 1:
        return None
    return datamodule.augment

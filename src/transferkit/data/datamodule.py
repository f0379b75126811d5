"""A LightningDataModule over `root/{train,val,test}/<class>/<image>` folders."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from transferkit.backbones.preprocessing import CROP_SCALE, Preprocessing, augment_policy, crop_scale_range
from transferkit.data import scan
from transferkit.data.digests import split_digests
from transferkit.data.file_names import find_named_splits, label_pattern
from transferkit.data.folders import (
    Splits,
    class_counts,
    exclude_files,
    find_splits,
    read_exclude,
    skip_files,
)
from transferkit.data.folds import check_folds, cross_validation_fold
from transferkit.data.images import ImageListDataset
from transferkit.data.position import EpochPosition
from transferkit.data.sampling import (
    EpochSampler,
    balance_mode,
    balanced_class_weights,
    balanced_weights,
    positive_weights,
)
from transferkit.data.workers import default_num_workers
from transferkit.errors import ConfigError, DataError
from transferkit.features.loading import feature_loader

log = logging.getLogger(__name__)
BAD_IMAGE_POLICIES = ("error", "skip")


class ImageFolderDataModule(L.LightningDataModule):
    """Train/val(/test) image folders; classes come from train/. Without val/, val is split off
    train/ file by file (`transferkit.data.splitting`).

    Transforms follow `preprocessing`, which the train task sets to the model's, so the data is
    always fed the way the backbone's weights expect. `image_size`, `mean`, `std` and `crop_pct`
    given here override the weights' values (and end up in the checkpoint through the model).

    `augment` names the training policy (basic, trivial, randaugment, or false), whose random
    crop keeps `crop_scale` [min, max] of the image's area; `balance`
    counters class imbalance with loss weights or a re-weighted sampler; `mixup_alpha` and
    `cutmix_alpha` (0: off) mix training batches once they are on the device.

    `exclude` names a file listing images to leave out (one path a line: audit.py writes one).
    `folds` (k) cuts the training data into k cross-validation folds, each file's by a hash of its
    path and the seed (so no file changes fold when others come or go), and
    `fold` picks the one this module serves (see `transferkit.data.folds`; the train task runs
    every fold when `fold` is None).

    `label_from` (a regular expression with one group) reads each image's class from its file
    name instead of its folder's. Multi-label data needs a label file (`LabelFileDataModule`).
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        crop_pct: float | None = None,
        val_fraction: float = 0.2,
        augment: str | bool | None = "basic",
        crop_scale: Sequence[float] = CROP_SCALE,
        seed: int | None = 42,
        persistent_workers: bool = True,
        balance: str | None = "none",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        on_bad_image: str = "error",
        scan_cache_dir: str | Path | None = None,
        label_from: str | None = None,
        multilabel: bool = False,
        exclude: str | Path | None = None,
        folds: int | None = None,
        fold: int | None = None,
    ) -> None:
        super().__init__()
        if multilabel:
            raise ConfigError(
                "data.multilabel=true needs a label file: use data=csv data.labels=PATH (folders and "
                "file names give each image one label)."
            )
        if int(batch_size) <= 0:
            raise ConfigError(f"data.batch_size={batch_size} must be a positive integer.")
        if num_workers is not None and int(num_workers) < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be 0 or more (null: one per core).")
        if image_size is not None and int(image_size) < 16:
            raise ConfigError(
                f"data.image_size={image_size} is too small; use 32 or more (null: the weights')."
            )
        if crop_pct is not None and not 0.0 < float(crop_pct) <= 1.0:
            raise ConfigError(
                f"data.crop_pct={crop_pct} must lie in (0, 1]: the share of the resized image the "
                "evaluation crop keeps (1.0: all of it; null: the weights' own, 0.875 for most)."
            )
        if not 0.0 < float(val_fraction) < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1), e.g. 0.2.")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"data.on_bad_image={on_bad_image} must be error or skip.")
        for key, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not float(alpha) >= 0.0:
                raise ConfigError(f"data.{key}={alpha} must be 0 (off) or more; 0.2 to 1.0 is usual.")
        self.root = Path(root)
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.val_fraction = val_fraction
        self.augment = augment_policy(augment)
        self.crop_scale = crop_scale_range(crop_scale)
        self.seed = seed
        self.persistent_workers = persistent_workers
        self.balance = balance_mode(balance)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.preprocessing_overrides = {
            k: v
            for k, v in {"image_size": image_size, "mean": mean, "std": std, "crop_pct": crop_pct}.items()
            if v is not None
        }
        self.preprocessing = Preprocessing().with_overrides(**self.preprocessing_overrides)
        self.on_bad_image = on_bad_image
        self.scan_cache_dir = scan_cache_dir
        self.label_from = None if label_from is None else label_pattern(label_from).pattern
        self.exclude = exclude
        self.folds, self.fold = check_folds(folds, fold)
        self._multilabel = False
        self.bad_images: dict[Path, str] = {}  # skipped with on_bad_image=skip
        self.datasets: dict[str, ImageListDataset] = {}
        self.feature_sets: dict[str, Dataset] | None = None
        self.feature_batch_size = self.batch_size
        self.position = EpochPosition()

    @cached_property
    def folders(self) -> Splits:
        """The files and classes as listed (no image opened), less those `exclude` lists, and with
        `fold` set, cut to that cross-validation fold; raises DataError on a malformed folder."""
        splits = self.listed()
        if self.exclude is not None:
            splits, dropped, absent = exclude_files(
                splits, read_exclude(self.exclude, self.root), self.exclude
            )
            log.info("Left out %d image(s) that data.exclude=%s lists.", dropped, self.exclude)
            if absent:
                log.warning(
                    "%d path(s) that data.exclude=%s lists are not in the data.", absent, self.exclude
                )
        if self.fold is None:
            return splits
        return cross_validation_fold(splits, self.folds, self.fold, self.seed, self.root)

    def listed(self) -> Splits:
        """The data's own splits: class folders, or labels from file names."""
        if self.label_from is not None:
            return find_named_splits(self.root, self.label_from, self.val_fraction, self.seed)
        return find_splits(self.root, self.val_fraction, self.seed)

    @cached_property
    def splits(self) -> Splits:
        """`folders` with every image checked once: a bad one stops here (on_bad_image=error) or
        is left out (skip)."""
        folders = self.folders
        samples = folders.train + folders.val + (folders.test or [])
        cache = scan.cache_file(self.scan_cache_dir, self.root) if self.scan_cache_dir is not None else None
        bad = scan.scan_images([path for path, _ in samples], cache, workers=max(1, self.num_workers))
        if not bad:
            return folders
        listed = "; ".join(f"{path} ({error})" for path, error in list(bad.items())[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        if self.on_bad_image == "error":
            raise DataError(
                f"{len(bad)} file(s) cannot be read as images: {listed}{more}. Remove or replace them, "
                "or set data.on_bad_image=skip to train without them."
            )
        log.warning("Skipping %d file(s) that cannot be read as images: %s%s", len(bad), listed, more)
        self.bad_images = {**self.bad_images, **bad}  # after any a subclass found missing
        return skip_files(folders, set(bad))

    def check_images(self) -> Splits:
        """The splits with every image decoded once (verdicts cached by file): a bad one stops
        the run here (on_bad_image=error) or is left out (skip). The train task calls it once the
        config is known to work, so a typo costs no scan."""
        return self.splits

    def split_digests(self) -> dict[str, Any]:
        """Each split's file count and digest, and how val was made (`transferkit.data.digests`):
        what a checkpoint records, so eval and a resume can tell when the files are not the
        run's any more, and eval whether a val that changed may hold images the run trained on."""
        return split_digests(self.splits, self.root)

    @property
    def class_names(self) -> list[str]:
        return self.folders.class_names

    @property
    def has_test(self) -> bool:
        return self.folders.test is not None

    @property
    def multilabel(self) -> bool:
        """Whether an image may have any number of labels (0/1 per class targets)."""
        return self._multilabel

    @property
    def class_counts(self) -> list[int]:
        """Training images per class, in `class_names` order (multi-label: those it is present in)."""
        return class_counts(self.splits.train, len(self.class_names))

    def class_weights(self) -> list[float] | None:
        """Loss weights per class when `balance` is weights, None otherwise: n / (k * count) for
        cross-entropy, or BCE's pos_weight, negatives / positives, with multi-label data."""
        if self.balance != "weights":
            return None
        if self.multilabel:
            return positive_weights(self.class_counts, len(self.splits.train))
        return balanced_class_weights(self.class_counts)

    @cached_property
    def batch_mix(self) -> Callable[..., Any] | None:
        """MixUp and/or CutMix (one of them, at random, per batch), or None when both are off."""
        num_classes = len(self.class_names)
        mixes = [
            mix(alpha=alpha, num_classes=num_classes)
            for mix, alpha in ((T.MixUp, self.mixup_alpha), (T.CutMix, self.cutmix_alpha))
            if alpha > 0
        ]
        if not mixes:
            return None
        return mixes[0] if len(mixes) == 1 else T.RandomChoice(mixes)

    def setup(self, stage: str | None = None) -> None:
        splits = self.splits
        evaluate = self.preprocessing.transforms(train=False)
        self.datasets = {
            "train": ImageListDataset(
                splits.train, self.preprocessing.transforms(True, self.augment, self.crop_scale), self.seed
            ),
            "val": ImageListDataset(splits.val, evaluate),
        }
        if splits.test is not None:
            self.datasets["test"] = ImageListDataset(splits.test, evaluate)

    def use_features(self, feature_sets: dict[str, Dataset] | None, batch_size: int | None = None) -> None:
        """Serve cached backbone features instead of images (None: images again), in batches of
        `batch_size` (None: `batch_size`, as images)."""
        self.feature_sets = feature_sets
        self.feature_batch_size = batch_size or self.batch_size

    @property
    def training_augment(self) -> str | None:
        """The augmentation training actually gets: the data's policy, or None when cached
        features of one view (the evaluation transform) replace the images."""
        cached = (self.feature_sets or {}).get("train")
        if cached is not None and cached.views == 1:
            return None
        return self.augment

    @property
    def train_batch_size(self) -> int:
        """The batch training runs in: the images', or the one chosen for cached features."""
        return self.batch_size if self.feature_sets is None else self.feature_batch_size

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        """`split`'s loader; val and test are split between DDP ranks without repeats. Cached
        features come a whole batch at a time (`features.loading`)."""
        if self.feature_sets is not None:
            dataset = self.feature_sets[split]
            if sampler is None and split != "train":
                sampler = self._eval_sampler(split, dataset)
            return feature_loader(dataset, sampler, self.feature_batch_size)
        if split not in self.datasets:
            self.setup()
        dataset, workers = self.datasets[split], self.num_workers
        if sampler is None and split != "train":
            sampler = self._eval_sampler(split, dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self._uses_cuda(),
            persistent_workers=self.persistent_workers and workers > 0,
            generator=self._generator(),  # its own: loading never draws from the global RNG
        )

    def _generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(self.seed))
        return generator

    def _uses_cuda(self) -> bool:
        trainer = self.trainer
        if trainer is None:
            return torch.cuda.is_available()
        return trainer.strategy.root_device.type == "cuda"

    def _replicas(self) -> tuple[int, int]:
        """(processes, this one's rank) when the trainer splits the data between processes
        (DDP); (1, 0) otherwise."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    def _eval_sampler(self, split: str, dataset: Dataset) -> Sampler | None:
        """Under DDP, each rank's share of val/test, none of it twice: Lightning's own sampler
        pads the shares to the same size with repeated images, which the metrics would count."""
        world, rank = self._replicas()
        if world == 1:
            return None
        if len(dataset) < world:
            raise DataError(
                f"The {split} split has {len(dataset)} image(s), fewer than the {world} processes that "
                f"evaluate it; run on fewer devices or give {split} more images."
            )
        return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch as a function of (seed, epoch); with balance=sampler, drawn so every
        class comes up equally often instead. Under DDP each rank trains its share of that one
        order. A run resumed mid-epoch skips what it trained on."""
        labels = [label for _, label in self.splits.train]
        weights = balanced_weights(labels) if self.balance == "sampler" else None
        world, rank = self._replicas()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        skip = self.position.resumed_samples(self.trainer, len(labels), self.train_batch_size, world)
        sampler = EpochSampler(len(labels), self.seed, weights, skip, world, rank, epoch)
        return self._loader("train", sampler=sampler)

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: how far the epoch in progress got (see `EpochPosition`)."""
        if self.trainer is None:
            return {}
        return self.position.state_dict(self.trainer, self.train_batch_size, self._replicas()[0])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test split, or val when the dataset has none (so `trainer.test` always works)."""
        return self._loader("test" if self.has_test else "val")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mix training batches (soft (B, C) targets); evaluation batches pass untouched.

        Here rather than in the dataset: mixing needs whole batches, and runs on the device.
        """
        if self.batch_mix is None or self.trainer is None or not self.trainer.training:
            return batch
        images, labels = batch
        return self.batch_mix(images, labels)

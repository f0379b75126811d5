"""A LightningDataModule over `root/{train,val,test}/<class>/<image>` folders."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from transferkit.data.folders import Splits, find_splits
from transferkit.data.images import ImageListDataset
from transferkit.errors import ConfigError
from transferkit.preprocessing import Preprocessing


def default_num_workers() -> int:
    """The cores this process may use, at most 8 (more rarely helps decoding)."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class ImageFolderDataModule(L.LightningDataModule):
    """Train/val(/test) image folders; classes come from train/.

    Transforms follow `preprocessing`, which the train task sets to the model's, so the data is
    always fed the way the backbone's weights expect. `image_size`, `mean` and `std` given here
    override the weights' values (and end up in the checkpoint through the model).
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        val_fraction: float = 0.2,
        augment: bool = True,
        seed: int = 42,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if int(batch_size) <= 0:
            raise ConfigError(f"data.batch_size={batch_size} must be a positive integer.")
        if num_workers is not None and int(num_workers) < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be 0 or more (null: one per core).")
        if image_size is not None and int(image_size) < 16:
            raise ConfigError(
                f"data.image_size={image_size} is too small; use 32 or more (null: the weights')."
            )
        self.root = Path(root)
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.val_fraction = val_fraction
        self.augment = bool(augment)
        self.seed = seed
        self.persistent_workers = persistent_workers
        self.preprocessing_overrides = {
            k: v for k, v in {"image_size": image_size, "mean": mean, "std": std}.items() if v is not None
        }
        self.preprocessing = Preprocessing().with_overrides(**self.preprocessing_overrides)
        self.datasets: dict[str, ImageListDataset] = {}

    @cached_property
    def splits(self) -> Splits:
        """Scanned once, on first use; raises DataError on a malformed folder."""
        return find_splits(self.root, self.val_fraction, self.seed)

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    @property
    def has_test(self) -> bool:
        return self.splits.test is not None

    def setup(self, stage: str | None = None) -> None:
        splits = self.splits
        evaluate = self.preprocessing.transforms(train=False)
        self.datasets = {
            "train": ImageListDataset(splits.train, self.preprocessing.transforms(True, self.augment)),
            "val": ImageListDataset(splits.val, evaluate),
        }
        if splits.test is not None:
            self.datasets["test"] = ImageListDataset(splits.test, evaluate)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self._uses_cuda(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def _uses_cuda(self) -> bool:
        trainer = self.trainer
        if trainer is None:
            return torch.cuda.is_available()
        return trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test split, or val when the dataset has none (so `trainer.test` always works)."""
        return self._loader("test" if self.has_test else "val")

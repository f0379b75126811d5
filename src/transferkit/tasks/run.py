"""A training run as `set_up` leaves it: what the fit, the measurement and the outputs (and a
cross-validation's per-fold ones) work on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.model.module import TransferModule
from transferkit.training.finetune import BlockFinetuning


@dataclass
class TrainingRun:
    cfg: DictConfig
    datamodule: ImageFolderDataModule
    finetune: BlockFinetuning
    trainer: L.Trainer
    model: TransferModule
    feature_cache: Path | None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

"""Checkpoints that mean what their names say: `best.ckpt` the best epoch by the monitored
metric, `last.ckpt` the newest completed epoch, whatever the metric did."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that `save_last` saves after every epoch.

    Lightning 2.6 writes `last.ckpt` only in a step where a top-k checkpoint was written, so with
    `save_top_k=1` a run whose metric stops improving keeps `last.ckpt` at its best epoch, and a
    resume from it silently trains those epochs again.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        """Save `last` unless this step is saved already (then Lightning wrote it, or nothing was
        to be saved: sanity check, fast_dev_run, validate/test)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

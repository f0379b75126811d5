"""Checkpoints that mean what their names say: `best.ckpt` the best epoch by the monitored
metric, `last.ckpt` the newest completed epoch, whatever the metric did; when both are of the same
epoch, they are one file on disk (a hard link)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from torch import Tensor

from transferkit.files import link_or_copy


def unshare(path: str | Path) -> None:
    """Remove `path` if it is a hard link to another name, so that writing it leaves the other
    name's content alone (a checkpoint written into a shared file would change both)."""
    if os.path.isfile(path) and os.stat(path).st_nlink > 1:
        os.remove(path)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that `save_last` saves after every epoch, and that a
    `last.ckpt` of the epoch `best.ckpt` was just saved at is a hard link to it.

    Lightning 2.6 writes `last.ckpt` only in a step where a top-k checkpoint was written, so with
    `save_top_k=1` a run whose metric stops improving keeps `last.ckpt` at its best epoch, and a
    resume from it silently trains those epochs again. Its `save_last="link"` makes a symbolic
    link, to whichever checkpoint it saved last, even one of an earlier epoch.
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

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        """Name `last_model_path` before the first save, as Lightning does only before saving
        `last`: a best checkpoint that becomes `last.ckpt` too then records it as `last` would."""
        if self.save_last and not self.last_model_path and not self._enable_version_counter:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            unshare(filepath)
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        """Link `last` to the top-k checkpoint saved in this very step; else save it as Lightning does."""
        saved = self._last_checkpoint_saved
        saved_now = (
            saved
            and (saved in self.best_k_models or saved == self.best_model_path)
            and self._last_global_step_saved == trainer.global_step
            and not self._enable_version_counter  # the version counter may rename `last`
        )
        if not (self.save_last and saved_now):
            super()._save_last_checkpoint(trainer, monitor_candidates)
            return
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        previous, self.last_model_path = self.last_model_path, filepath
        if trainer.is_global_zero:
            link_or_copy(saved, filepath)
        trainer.strategy.barrier()
        self._last_checkpoint_saved = filepath
        if previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)

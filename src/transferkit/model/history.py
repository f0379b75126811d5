"""Each epoch's train and val metrics, kept for the curves a run plots, and carried through its
checkpoints so that a resumed run's curves lack no epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

STAGES = ("train", "val")


class EpochHistory(L.Callback):
    """One row of metric values per epoch and stage (`epochs["val"][3]`: epoch 3's val/*).

    The module records its values as it logs them (`record`): Lightning calls a callback's
    `on_train_epoch_end` before the module's, where the train metrics are computed, and the
    checkpoint of that epoch is written right after it. The rows are restored from a
    checkpoint only when a fit resumes from it, not when the best checkpoint is validated.
    """

    def __init__(self) -> None:
        self.epochs: dict[str, list[dict[str, float]]] = {stage: [] for stage in STAGES}
        self._fitting = False

    def record(self, trainer: L.Trainer, stage: str, values: dict[str, Any]) -> None:
        """Append one epoch's values of `stage` while fitting (not in the sanity check)."""
        if stage in self.epochs and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.epochs[stage].append({k: float(v) for k, v in values.items()})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = stage == TrainerFn.FITTING

    def state_dict(self) -> dict[str, Any]:
        return {stage: list(rows) for stage, rows in self.epochs.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting:
            self.epochs = {stage: list(state_dict.get(stage, [])) for stage in STAGES}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written before this callback existed keeps the rows at its top level."""
        if self.state_key not in checkpoint.get("callbacks", {}) and "history" in checkpoint:
            self.load_state_dict(checkpoint["history"])

"""Where a resumed epoch goes on: the samples of its order already trained, recorded in every
checkpoint (all ranks together), so a resume skips them whatever its batch size or number of
processes."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class EpochPosition:
    """The epoch in progress when the train loader was made and where it started, as (epoch,
    samples trained before, batches Lightning counts as done); `trained`: from a checkpoint."""

    def __init__(self) -> None:
        self.epoch_start: tuple[int, int, int] = (-1, 0, 0)
        self.trained: dict[str, int] | None = None

    def resumed_samples(self, trainer: L.Trainer | None, n: int, batch_size: int, world: int) -> int:
        """Samples of the current epoch's order (all ranks together) that a run resumed
        mid-epoch has already trained on: as recorded in the checkpoint, so the batch size or
        number of processes may differ now.

        Lightning counts the batches done before the interruption itself; when their size has
        changed, that count is re-expressed in batches of the current size, so the epoch still
        ends, validates and steps its schedulers where it should.
        """
        self.epoch_start = (-1, 0, 0)
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        progress = trainer.fit_loop.epoch_loop.batch_progress
        done, epoch = progress.current.processed, trainer.current_epoch
        trained = self.trained
        if trained is not None and trained.get("epoch") == epoch:
            samples = int(trained["samples_trained"])
        else:  # a checkpoint that did not record it: assume nothing changed
            samples = done * batch_size * world
        per_rank = math.ceil(n / world)
        left_per_rank = math.ceil(max(n - samples, 0) / world)
        counted = math.ceil(per_rank / batch_size) - math.ceil(left_per_rank / batch_size)
        if counted != done:
            log.info(
                "Resuming epoch %d after %d trained samples: %d batches of %d done, %d to go.",
                epoch,
                samples,
                counted,
                batch_size,
                math.ceil(per_rank / batch_size) - counted,
            )
            for tracker in (progress.current, progress.total):
                for count in ("ready", "started", "processed", "completed"):
                    setattr(tracker, count, getattr(tracker, count) + counted - done)
        self.epoch_start = (epoch, samples, counted)
        return samples

    def state_dict(self, trainer: L.Trainer, batch_size: int, world: int) -> dict[str, int]:
        """The samples of the epoch in progress trained so far (all ranks)."""
        epoch = trainer.current_epoch
        start_epoch, samples, counted = self.epoch_start
        if start_epoch != epoch:
            samples, counted = 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": epoch, "samples_trained": samples + (done - counted) * batch_size * world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.trained = dict(state_dict)

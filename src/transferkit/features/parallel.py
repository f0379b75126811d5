"""The feature cache built by every DDP rank at once.

Lightning starts the other ranks when the fit starts, so the build happens in the `setup` hook,
once the process group exists: rank 0 takes the cache's lock (or waits for another run's cache)
and makes a temporary directory; every rank extracts its batches of every split (batch b is
rank b % world's: the batches one process would run, so the bytes are the same) into a shard
of its own; when all ranks say they succeeded, rank 0 assembles the shards into the whole files
and publishes the directory, and every rank opens it. A rank that dies stops the others at the
next collective, before anything is published: what is left is a temporary directory no run
reads (the lock's next holder removes it); the lock is freed as rank 0's process ends.
`features.dir` must be a directory every node sees.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from transferkit.features import store
from transferkit.features.cache import (
    CacheNotWritten,
    Extraction,
    FeatureSet,
    cache_path,
    claim,
    job_key,
    load,
    not_written,
)
from transferkit.features.lock import CacheLock

log = logging.getLogger(__name__)


class ParallelCache(L.Callback):
    """Builds `job`'s cache under `directory` with every rank as the fit starts, then hands the
    sets to `attach` on every rank; if the disk refuses it, the run trains uncached, on every
    rank alike (`required`: refuses instead, for features.cache=true)."""

    def __init__(
        self,
        job: Extraction,
        directory: Path,
        attach: Callable[[dict[str, FeatureSet]], None],
        required: bool = False,
    ) -> None:
        self.job, self.directory, self.attach, self.required = job, Path(directory), attach, required
        self.key = job_key(job)
        self.path = cache_path(directory, self.key)
        self.done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.done:
            return
        self.done = True
        strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
        lock = CacheLock(self.path)
        plan: dict[str, Any] = {}
        if rank == 0:
            plan = self._claim(lock)
        plan = strategy.broadcast(plan, src=0)
        if "error" not in plan and "tmp" in plan:
            plan = self._build(strategy, lock, Path(plan["tmp"]), rank, world)
        if "error" in plan:
            if self.required:
                raise CacheNotWritten(plan["error"])
            log.warning("Training without a feature cache: %s", plan["error"])
            return
        sets = load(self.path, self.key, self.job.splits)
        if sets is None:
            raise CacheNotWritten(
                f"The feature cache {self.path} that rank 0 published cannot be read here: "
                "features.dir must be a directory every node sees (a shared filesystem)."
            )
        self.attach(sets)

    def _claim(self, lock: CacheLock) -> dict[str, Any]:
        """Rank 0: the cache is there (another run's), or a temporary directory to build it in."""
        if load(self.path, self.key, self.job.splits) is not None:
            log.info("Feature cache reused: %s", self.path)
            return {}
        try:
            if claim(lock, self.path, self.key, self.job.splits) is not None:
                return {}
            tmp = store.temporary_dir(self.path)
            tmp.mkdir()
            return {"tmp": str(tmp)}
        except OSError as error:
            lock.release()
            return {"error": str(not_written(self.directory, error))}

    def _build(self, strategy: Any, lock: CacheLock, tmp: Path, rank: int, world: int) -> dict[str, Any]:
        """Every rank's shards, then (rank 0) the whole cache, published; {} or the error."""
        error = None
        try:
            self.job.write_shards(tmp, rank, world)
        except OSError as failure:
            error = str(not_written(self.directory, failure))
        if not strategy.reduce_boolean_decision(error is None, all=True):
            error = error or "another rank could not write its part of the feature cache"
        outcome: dict[str, Any] = {"error": error} if error else {}
        if rank == 0:
            try:
                if not error:
                    self._assemble(tmp, world)
                    store.publish(tmp, self.path, self.key, list(self.job.splits))
                    log.info("Feature cache written by %d processes: %s", world, self.path)
            except (OSError, CacheNotWritten) as failure:
                outcome = {
                    "error": str(
                        failure
                        if isinstance(failure, CacheNotWritten)
                        else not_written(self.directory, failure)
                    )
                }
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                lock.release()
        return strategy.broadcast(outcome, src=0)

    def _assemble(self, tmp: Path, world: int) -> None:
        for split, items in self.job.splits.items():
            for rank in range(world):
                has_rows = rank * self.job.batch_size < len(items)
                if has_rows and not store.features_file(tmp, split, rank).exists():
                    raise CacheNotWritten(
                        f"Rank {rank}'s part of the feature cache is not in {tmp}: features.dir must be a "
                        "directory every node sees (a shared filesystem)."
                    )
        self.job.assemble(tmp, world)

"""Hydra's grid sweeper (`-m a=1,2 b=x,y`), except that a failed job does not end the sweep with
its traceback: every batch of jobs runs, the end-of-sweep callbacks run (the leaderboard prints
the board and how many jobs failed), then the process exits 1.

A Hydra plugin must live in the `hydra_plugins` namespace to be found; this one is installed
with transferkit and chosen by `conf/hydra/sweeper/grid.yaml`. It imports no torch: Hydra imports
every plugin whenever it starts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf


class GridSweeper(BasicSweeper):
    """BasicSweeper's jobs and batches, each batch launched whatever the earlier ones returned."""

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: list[Sequence[JobReturn]] = []
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            returns.append(self.launcher.launch(batch, initial_job_idx=sum(map(len, returns))))
        if any(job.status == JobStatus.FAILED for batch in returns for job in batch):
            # Hydra raises the first failure at this point, skipping on_multirun_end: run it, then fail.
            self.hydra_context.callbacks.on_multirun_end(config=self.config)
            sys.exit(1)
        return returns

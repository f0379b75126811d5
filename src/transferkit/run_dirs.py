"""A run never writes into an earlier run's directory, unless it is resuming that run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("transferkit")


def holds_a_run(directory: Path) -> bool:
    return (directory / ".hydra").is_dir() or (directory / "results.json").is_file()


class KeepExistingRuns(Callback):
    """Checked before Hydra writes anything (it would replace the run's .hydra/ first)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:  # a DDP worker joining the run its launcher made
            return
        run_dir = Path(config.hydra.run.dir)
        resuming = config.get("ckpt_path") is not None and config.get("train", False)
        if holds_a_run(run_dir) and not resuming:
            log.error(
                "hydra.run.dir=%s already holds a run; choose a new directory (or leave hydra.run.dir "
                "out), or resume that run with ckpt_path=last.",
                run_dir,
            )
            sys.exit(2)

"""One skeleton for every task (lightning-hydra-template's `task_wrapper`): time it, write its
results to the run directory, print them, and end a user error with one line and exit code 2.
Each task's `main` checks its config first (`tasks.settings.check_config`)."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from transferkit.console import print_results, rank_zero_only, set_up_console
from transferkit.errors import Interrupted, UserError, exit_code
from transferkit.runs.directories import write_json

log = logging.getLogger(__name__)
Task = Callable[[DictConfig], dict[str, Any]]


def task_wrapper(title: str) -> Callable[[Task], Task]:
    """The task returns its results; they gain `wall_s` (unless the task timed itself), go to
    `<run dir>/results.json` and are printed as a table headed `title` (formatted with `cfg=`,
    after the task: a resumed run has moved its run directory by then)."""

    def wrap(task: Task) -> Task:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> dict[str, Any]:
            started = time.perf_counter()
            results = task(cfg)
            results.setdefault("wall_s", round(time.perf_counter() - started, 2))
            save_results(Path(cfg.paths.output_dir), title.format(cfg=cfg), results)
            return results

        return run

    return wrap


@rank_zero_only
def save_results(output_dir: Path, title: str, results: dict[str, Any]) -> None:
    write_json(output_dir / "results.json", results)
    print_results(title, results)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def interrupted(error: BaseException) -> bool:
    """A signal stopped training: ours, or Lightning's SIGTERMException (raised only where
    Lightning is loaded, so it is looked up only there)."""
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return isinstance(error, Interrupted) or (
        lightning is not None and isinstance(error, lightning.SIGTERMException)
    )


def exit_on_user_error(main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """A user error ends the process with its one-line message and exit code 2, not a traceback;
    in a multirun it fails the job (Hydra records it) and the sweep goes on."""

    @functools.wraps(main)
    def boundary(cfg: DictConfig) -> Any:
        set_up_console()
        try:
            return main(cfg)
        except UserError as error:
            log.error("%s", error)
            if in_multirun():
                raise
            sys.exit(error.exit_code)
        except BaseException as error:  # Lightning's SIGTERMException is a SystemExit
            if interrupted(error):  # last.ckpt is saved and the log says how to resume
                sys.exit(exit_code(error))
            if not isinstance(error, Exception):
                raise
            # A spawned DDP process re-raises our error as text; keep its last line.
            last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            if not last.startswith("transferkit.errors."):
                raise
            log.error("%s", last.split(": ", 1)[-1])
            sys.exit(UserError.exit_code)

    return boundary

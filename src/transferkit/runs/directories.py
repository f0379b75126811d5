"""Run directories: a run never writes into an earlier run's directory unless it is resuming that
run, a resume continues in its own directory, and results files are written whole."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from transferkit.errors import ConfigError
from transferkit.files import write_atomic

log = logging.getLogger(__name__)

# The config's resolvers, registered here as every task imports this module: first those run
# directories are named with (conf/hydra/default.yaml, conf/paths/default.yaml). One random
# suffix per process: runs started in the same second never collide.
_RUN_ID = secrets.token_hex(3)
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID)
if not OmegaConf.has_resolver("cwd"):  # cached: every later read gives the directory the run started in
    OmegaConf.register_new_resolver("cwd", os.getcwd, use_cache=True)
# And the metric a run is judged by (conf/train.yaml's `monitor`): what checkpoints, early
# stopping and sweeps go by follows the data, val/map for multi-label data, else val/acc.
if not OmegaConf.has_resolver("primary_metric"):
    OmegaConf.register_new_resolver(
        "primary_metric", lambda multilabel: "val/map" if multilabel else "val/acc"
    )


def holds_a_run(directory: Path) -> bool:
    return (directory / ".hydra").is_dir() or (directory / "results.json").is_file()


class KeepExistingRuns(Callback):
    """Checked before Hydra writes anything (it would replace the run's .hydra/ first)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:  # a DDP worker joining the run its launcher made
            return
        run_dir = Path(config.hydra.run.dir)
        training = config.hydra.job.config_name == "train" and config.get("train", True) is not False
        resuming = config.get("ckpt_path") is not None and training
        if holds_a_run(run_dir) and not resuming:
            log.error(
                "hydra.run.dir=%s already holds a run; choose a new directory (or leave hydra.run.dir "
                "out), or resume that run with ckpt_path=last.",
                run_dir,
            )
            sys.exit(2)


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, str]:
    """The checkpoint file `ckpt_path` names (None without one) and the directory the run writes
    to: a run continued from a checkpoint inside a run directory writes there (checkpoints,
    metrics, results.json), so a resumed run stays one run; this invocation's own Hydra
    directory is then moved into it (`move_into_run`).

    `last` is checkpoints/last.ckpt of this run directory (with hydra.run.dir=<run>), else of the
    newest run under logs/<task>/runs.
    """
    ckpt_path, output_dir = cfg.get("ckpt_path"), str(cfg.paths.output_dir)
    if not ckpt_path:
        return None, output_dir
    if ckpt_path == "last":
        own = Path(output_dir) / "checkpoints" / "last.ckpt"
        runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
        found = [own] if own.is_file() else sorted(runs.glob("*/checkpoints/last.ckpt"), key=os.path.getmtime)
        if not found:
            raise ConfigError(f"ckpt_path=last: no run in {runs} has checkpoints/last.ckpt; give a path.")
        ckpt_path = str(found[-1])
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist.")
    run_dir = path.resolve().parent.parent
    if path.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
        if run_dir != Path(output_dir).resolve():
            move_into_run(Path(output_dir), run_dir)
        output_dir = str(run_dir)
    return str(path), output_dir


def settle(cfg: DictConfig, ckpt_path: str | None, output_dir: str, seed: int) -> None:
    """Write what was resolved into the run's config, which every later step reads (and whose
    interpolations, such as the checkpoint directory, follow `output_dir`)."""
    with open_dict(cfg):
        cfg.ckpt_path, cfg.paths.output_dir, cfg.seed = ckpt_path, output_dir, seed


def move_into_run(new_dir: Path, run_dir: Path) -> None:
    """Fold the directory Hydra made for this invocation into the resumed run: its config goes
    to .hydra/resumed_<name>/, its log is appended to the run's log."""
    log.info("Resuming %s: its checkpoints, metrics and results are updated in place.", run_dir)
    if (new_dir / ".hydra").is_dir():
        shutil.move(str(new_dir / ".hydra"), run_dir / ".hydra" / f"resumed_{new_dir.name}")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == new_dir:
            handler.close()
            old_log = Path(handler.baseFilename)
            handler.baseFilename = str(run_dir / old_log.name)
            handler.mode = "a"
            with open(handler.baseFilename, "a") as f:
                f.write(old_log.read_text())
            old_log.unlink()
    if new_dir.is_dir() and not any(new_dir.iterdir()):
        new_dir.rmdir()


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON, atomically (`files.write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")

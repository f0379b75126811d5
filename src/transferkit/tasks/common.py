"""What every task shares: config resolvers, building objects from config groups, the user-error
boundary, and console output."""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf
from rich import get_console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

from transferkit.errors import ConfigError, DataError, UserError
from transferkit.interrupts import Interrupted, exit_code

log = logging.getLogger("transferkit")
R = TypeVar("R")

# One random suffix per process: run directories started in the same second never collide.
_RUN_ID = secrets.token_hex(3)
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID)
if not OmegaConf.has_resolver("cwd"):  # cached: every later read gives the directory the run started in
    OmegaConf.register_new_resolver("cwd", os.getcwd, use_cache=True)


def user_errors_exit(task: Callable[[DictConfig], R]) -> Callable[[DictConfig], R]:
    """A user error ends the process with its one-line message and exit code 2, not a traceback."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> R:
        try:
            return task(cfg)
        except (Interrupted, SIGTERMException) as error:  # last.ckpt is saved and the log says how to resume
            sys.exit(exit_code(error))
        except UserError as error:
            log.error("%s", error)
            if in_multirun():  # Hydra records the job as failed and the sweep goes on
                raise
            sys.exit(error.exit_code)
        except Exception as error:
            # A spawned DDP process re-raises our error as text; keep its last line.
            last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            if not last.startswith("transferkit.errors."):
                raise
            log.error("%s", last.split(": ", 1)[-1])
            sys.exit(UserError.exit_code)

    return wrapper


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build(cfg: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a user error raised while building comes out as itself
    (Hydra wraps every exception in InstantiationException)."""
    try:
        return instantiate(cfg, **kwargs)
    except MissingMandatoryValue as error:
        raise ConfigError(
            f"{error.full_key} must be set: add {error.full_key}=... to the command line."
        ) from None
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, MisconfigurationException):  # Lightning: devices, accelerator, strategy
            raise ConfigError(f"{cause} (check trainer.*)") from None
        raise


def plain(cfg: Any) -> Any:
    """A config node as plain Python data (what checkpoints and loggers can store)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Objects of a group laid out as `name: {_target_: ...}`; `name: null` drops one."""
    if not cfg:
        return []
    return [build(node) for node in cfg.values() if node is not None and "_target_" in node]


def build_model(
    cfg: DictConfig,
    class_names: list[str],
    preprocessing: dict[str, Any],
    class_weights: list[float] | None = None,
):
    """The LightningModule from the model, optimizer and scheduler groups."""
    return build(
        cfg.model,
        class_names=list(class_names),
        class_weights=class_weights,
        optimizer=plain(cfg.get("optimizer")),
        scheduler=plain(cfg.get("scheduler")),
        preprocessing=preprocessing,
        _recursive_=False,
        _convert_="all",
    )


def recorded_data_config(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The data config a checkpoint records, so eval finds the same splits again: the root made
    absolute, without the settings that belong to the machine (workers)."""
    data = {k: v for k, v in plain(cfg).items() if k not in ("num_workers", "persistent_workers")}
    data["root"] = str(Path(datamodule.root).resolve())
    return data


def check_same_classes(model: Any, data_classes: list[str]) -> None:
    if model.class_names != list(data_classes):
        raise DataError(
            f"The checkpoint was trained on classes {model.class_names}, the data has {list(data_classes)}; "
            "evaluate it on data with the same class folders."
        )


def print_config_tree(
    cfg: DictConfig, first: tuple[str, ...] = ("data", "model", "finetune", "trainer")
) -> None:
    tree = Tree("config", guide_style="dim")
    keys = [k for k in first if k in cfg] + [k for k in cfg if k not in first]
    for key in keys:
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text, "yaml", background_color="default"))
    get_console().print(tree)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file. Each write has its own temporary file, so
    processes writing one path at once (parallel sweep jobs) never rename each other's; it is
    created like a plain file (the umask's permissions, not mkstemp's 0600: others may read runs)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with tmp.open("x") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def print_results(title: str, results: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths are shown whole, to be copied
    for key, value in results.items():
        if isinstance(value, float):
            value = f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        table.add_row(key, str(value))
    get_console().print(table)

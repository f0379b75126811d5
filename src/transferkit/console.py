"""What the tasks print: the composed config as a tree and a results table, from rank zero only,
on a console that says only what matters: whole lines and no colour codes in a file or a pipe, and
none of Lightning's messages that are false or useless for these runs."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich import get_console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

# Not a terminal (a file, a pipe, CI): Rich would cut every line at 80 columns, paths included.
PIPED_WIDTH = 1000

# Lightning's info lines that are false or useless here, by their start: a model summary callback
# is configured on purpose (callbacks.rich_model_summary), and an advert for a cloud service.
DROPPED_LIGHTNING_INFO = (
    "Trainer already configured with model summary callbacks",
    "💡 Tip: For seamless cloud logging",
)


class _DropLightningInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DROPPED_LIGHTNING_INFO)


def set_up_console() -> None:
    """Lines whole (and without colour, which Rich leaves out off a terminal) when the output is
    not a terminal; Lightning's useless info lines dropped where Lightning logs them.

    The width goes through COLUMNS, which every Rich console reads: Lightning's progress bar
    replaces Rich's global console with a new one of its own."""
    if not get_console().is_terminal:
        os.environ["COLUMNS"] = str(PIPED_WIDTH)
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningInfo) for f in lightning_info.filters):
        lightning_info.addFilter(_DropLightningInfo())


def global_rank() -> int:
    """This process's rank: Lightning's where Lightning runs (its strategies set it), else
    the launcher's environment (torchrun, SLURM), else 0; so predict and serve, which import
    no Lightning, print as one process."""
    lightning = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if lightning is not None:
        return int(getattr(lightning.rank_zero_only, "rank", 0) or 0)
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def rank_zero_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run on rank 0 only (Lightning's rank_zero_only, without importing Lightning)."""

    @functools.wraps(fn)
    def on_rank_zero(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if global_rank() == 0 else None

    return on_rank_zero


@rank_zero_only
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


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


@rank_zero_only
def print_results(title: str, results: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths are shown whole, to be copied
    for key, value in results.items():
        table.add_row(key, _shown(value))
    get_console().print(table)

"""What the tasks print: the composed config as a tree and a results table, from rank zero only."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich import get_console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree


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

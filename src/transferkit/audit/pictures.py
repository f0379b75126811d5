"""The report's pictures: duplicate pairs side by side, and images titled with what the audit
says about them. An image that cannot be read is drawn as its error, not a crash."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from transferkit.data.images import load_rgb
from transferkit.errors import DataError

THUMB = 128
COLUMNS = 4


def _cell(ax, path: Path, title: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    ax.set_axis_off()
    ax.set_title(title, fontsize=7)
    try:
        image = load_rgb(path)
    except DataError as error:
        ax.text(0.5, 0.5, str(error)[:80], ha="center", va="center", fontsize=5, wrap=True)
        return
    image.thumbnail((THUMB, THUMB))
    ax.imshow(np.asarray(image))


def short(text: str, width: int = 28) -> str:
    """Both ends of a long name: the start tells the folder, the end the file."""
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return f"{text[:half]}…{text[-(width - 1 - half) :]}"


def draw_grid(cells: Sequence[tuple[Path, str]], path: Path, columns: int = COLUMNS) -> None:
    """A PNG of the (image, title) cells, `columns` to a row."""
    rows = max(1, math.ceil(len(cells) / columns))
    size = THUMB / 100 + 0.4
    figure = Figure(figsize=(columns * size, rows * (size + 0.5)), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (image, title) in zip(axes, cells, strict=False):
        _cell(ax, image, title)
    for ax in axes[len(cells) :]:
        ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)

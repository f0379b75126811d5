"""The most confident mistakes, drawn as a grid of the images with their true and predicted labels."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from transferkit.data.images import load_rgb
from transferkit.errors import DataError

GRID_COLUMNS = 4


def most_confident_mistakes(labels: torch.Tensor, probs: torch.Tensor, count: int) -> list[int]:
    """Indices of up to `count` misclassified samples, most confident prediction first: the ones
    most worth a look (a wrong label in the data, or a systematic confusion). Ties keep data order."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"Need probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}."
        )
    confidence, preds = probs.detach().cpu().max(dim=1)
    wrong = torch.nonzero(preds != labels.detach().cpu(), as_tuple=True)[0]
    order = torch.sort(confidence[wrong], descending=True, stable=True).indices
    return wrong[order][: max(count, 0)].tolist()


def _shorten(text: str, width: int) -> str:
    """Keep both ends of a long file name: the start tells the source, the end the number."""
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return f"{text[:half]}…{text[-(width - 1 - half) :]}"


def _draw_cell(ax: Any, path: Path, title: str, thumb: int) -> None:
    """One grid cell: the thumbnail, or the read error where the image should be."""
    ax.set_axis_off()
    ax.set_title(title, fontsize=7)
    try:
        image = load_rgb(path)
    except DataError as error:
        ax.text(
            0.5,
            0.5,
            textwrap.fill(str(error), 30),
            ha="center",
            va="center",
            fontsize=5,
            color="darkred",
            wrap=True,
            transform=ax.transAxes,
        )
        return
    image.thumbnail((thumb, thumb))
    ax.imshow(np.asarray(image))


def _empty_grid(path: Path) -> None:
    """The file always exists, so a reader (or a test) never wonders whether the step ran."""
    figure = Figure(figsize=(4.0, 1.5))
    figure.text(0.5, 0.5, "No misclassified images", ha="center", va="center", fontsize=14)
    figure.savefig(path, dpi=100)


def write_misclassified_grid(
    paths: list[str | Path],
    labels: torch.Tensor,
    probs: torch.Tensor,
    class_names: list[str],
    path: str | Path,
    count: int = 16,
    thumb: int = 128,
) -> int:
    """A PNG grid of the `count` most confidently wrong images, each titled with its true class,
    the predicted class with its probability, and its file name. An unreadable file becomes a
    cell with its error rather than a crash. Returns how many cells were drawn (0: no mistakes)."""
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
    if probs.shape[-1] != len(class_names):
        raise ValueError(
            f"probs have {probs.shape[-1]} classes but there are {len(class_names)} class names."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = most_confident_mistakes(labels, probs, count)
    if not chosen:
        _empty_grid(path)
        return 0
    columns = min(GRID_COLUMNS, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    cell = max(thumb / 100.0, 1.6) + 0.3  # inches at dpi 100: the thumbnail at full size, titles fit
    figure = Figure(figsize=(columns * cell, rows * (cell + 0.5)), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    confidence, preds = probs.detach().cpu().max(dim=1)
    for ax, index in zip(axes, chosen, strict=False):
        true_name = class_names[int(labels[index])]
        pred_name = class_names[int(preds[index])]
        file = Path(paths[index])
        name = _shorten(f"{file.parent.name}/{file.name}", 28)  # in class folders, names repeat
        title = f"true: {true_name}\npred: {pred_name} ({float(confidence[index]):.2f})\n{name}"
        _draw_cell(ax, Path(paths[index]), title, thumb)
    for ax in axes[len(chosen) :]:
        ax.set_axis_off()
    figure.savefig(path, dpi=100)
    return len(chosen)

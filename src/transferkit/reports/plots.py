"""The pictures a training run leaves in plots/: learning curves, and what the model sees."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transferkit.backbones.preprocessing import Preprocessing

# Curves: fixed margins in inches (a layout engine would draw the figure twice to find them).
CURVES_SIZE = (10.0, 4.0)
CURVES_MARGINS = {"left": 0.85, "right": 0.2, "bottom": 0.55, "top": 0.35, "between": 0.95}  # inches


SCORES = {"acc": "accuracy", "f1_micro": "micro F1, and val mAP"}  # the right panel's score


def plot_curves(history: dict[str, list[dict[str, float]]], path: str | Path, score: str = "acc") -> Path:
    """Loss and `score` per epoch, train and val side by side (`history[stage]` holds one dict
    of epoch metrics per epoch, as the module logs them): accuracy, or for multi-label models
    micro F1 with val's mean average precision beside it.

    The margins are fixed, not found by a layout engine (which costs a second drawing): they fit
    tick labels of up to 6 characters, as "0.0125" or "8000": losses from 10000 or under 0.001
    are written as short numbers times a power of ten, shown above the axis."""
    width, height = CURVES_SIZE
    margins = CURVES_MARGINS
    axes_width = (width - margins["left"] - margins["right"] - margins["between"]) / 2
    figure = Figure(figsize=CURVES_SIZE)
    axes = figure.subplots(
        1,
        2,
        gridspec_kw={
            "left": margins["left"] / width,
            "right": 1 - margins["right"] / width,
            "bottom": margins["bottom"] / height,
            "top": 1 - margins["top"] / height,
            "wspace": margins["between"] / axes_width,
        },
    )
    for ax, metric in zip(axes, ("loss", score), strict=True):
        lines = [("train", metric, "-o", "train"), ("val", metric, "-s", "val")]
        lines += [("val", "map", "-^", "val mAP")] if metric == "f1_micro" else []
        for stage, name, style, label in lines:
            key = f"{stage}/{name}"
            values = [epoch[key] for epoch in history.get(stage, []) if key in epoch]
            if values:
                ax.plot(range(len(values)), values, style, label=label, markersize=4)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss" if metric == "loss" else SCORES[metric])
        ax.set_title("Loss" if metric == "loss" else SCORES[metric].capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
        if metric != "loss":
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def unnormalise(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Normalised (B, 3, H, W) back to displayable [0, 1] pixels."""
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


# The contact sheet, in inches of the figure: each image's longer side, the gap between two
# images side by side, the band above each image for its class name, the band for the title on
# top and a sliver of white below the last row.
TILE_INCHES = 1.5
GAP_INCHES = 0.1
CAPTION_INCHES = 0.3
TITLE_INCHES = 0.32
BOTTOM_INCHES = 0.06
CAPTION_CHARS = 18


def _caption(name: str) -> str:
    """A class name short enough to stay above its own image."""
    return name if len(name) <= CAPTION_CHARS else name[: CAPTION_CHARS - 1] + "…"


def label_text(label: Any, class_names: Sequence[str]) -> str:
    """A class index's name, or a multi-label 0/1 row's names joined by ';' ('(none)' when empty)."""
    if isinstance(label, (int, np.integer)) or (isinstance(label, torch.Tensor) and label.ndim == 0):
        return class_names[int(label)]
    names = [name for name, on in zip(class_names, list(label), strict=True) if int(on)]
    return ";".join(names) or "(none)"


def _contact_sheet(pixels: np.ndarray, columns: int) -> tuple[np.ndarray, float, int, int, int]:
    """The (N, H, W, 3) uint8 images pasted on one white canvas, `columns` to a row, each below a
    blank band for its caption. Returns (canvas, canvas pixels per figure inch, cell width, cell
    height, caption band height), the last three in canvas pixels.

    matplotlib's time goes into axes (ticks, titles, layout), not pixels: one axes for the whole
    sheet costs a fraction of one axes per image."""
    count, height, width = pixels.shape[:3]
    side = max(height, width)
    per_inch = side / TILE_INCHES
    gap = max(1, round(GAP_INCHES * per_inch))
    caption = max(1, round(CAPTION_INCHES * per_inch))
    cell_width, cell_height = side + gap, height + caption  # wide room for captions, rows packed
    rows = math.ceil(count / columns)
    canvas = np.full((rows * cell_height, columns * cell_width, 3), 255, dtype=np.uint8)
    for index, picture in enumerate(pixels):
        row, column = divmod(index, columns)
        top = row * cell_height + caption
        left = column * cell_width + (cell_width - width) // 2
        canvas[top : top + height, left : left + width] = picture
    return canvas, per_inch, cell_width, cell_height, caption


def plot_batch(
    images: torch.Tensor,
    labels: Sequence[Any],
    class_names: Sequence[str],
    preprocessing: Preprocessing,
    path: str | Path,
    title: str = "Training images as the model sees them (augmented)",
) -> Path:
    """A contact sheet of a batch, each image captioned with its class, up to 8 to a row.

    Drawn as one image in one axes with the captions as text at the tiles' places, at fixed
    margins: an axes per image and a layout engine made this the slowest picture of a short run."""
    count = len(images)
    columns = min(8, count)
    pixels = unnormalise(images.float().cpu(), preprocessing).mul(255).round().to(torch.uint8)
    canvas, per_inch, cell_width, cell_height, caption = _contact_sheet(
        pixels.permute(0, 2, 3, 1).numpy(), columns
    )
    grid_height = canvas.shape[0] / per_inch
    figure_height = BOTTOM_INCHES + grid_height + TITLE_INCHES
    figure = Figure(figsize=(canvas.shape[1] / per_inch, figure_height))
    ax = figure.add_axes((0.0, BOTTOM_INCHES / figure_height, 1.0, grid_height / figure_height))
    ax.set_axis_off()
    ax.imshow(canvas, extent=(0, canvas.shape[1], canvas.shape[0], 0), aspect="auto")
    baseline_gap = 0.05 * per_inch  # between a caption's lowest descender and its image
    for index, label in enumerate(labels[:count]):
        row, column = divmod(index, columns)
        ax.text(
            (column + 0.5) * cell_width,
            row * cell_height + caption - baseline_gap,
            _caption(label_text(label, class_names)),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    figure.text(0.5, 1 - TITLE_INCHES / 2 / figure_height, title, ha="center", va="center", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path

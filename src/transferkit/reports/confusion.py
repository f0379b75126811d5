"""The confusion matrix of an evaluation, as numbers and as a heatmap whose labels always fit."""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import cbook, rcParams
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from torchmetrics.functional.classification import multiclass_confusion_matrix

MAX_ANNOTATED_CLASSES = 20  # above this, numbers in the heatmap cells are unreadable


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted (torchmetrics' convention)."""
    matrix = multiclass_confusion_matrix(
        preds.detach().cpu().long(), labels.detach().cpu().long(), num_classes=num_classes
    )
    return matrix.long()


def check_names(matrix: torch.Tensor, class_names: Sequence[str]) -> None:
    """A name per row and column, or the report would silently mislabel classes."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"A confusion matrix must be square, got shape {tuple(matrix.shape)}.")
    if matrix.shape[0] != len(class_names):
        raise ValueError(f"{matrix.shape[0]} classes in the matrix but {len(class_names)} class names.")


def _row_normalised(matrix: torch.Tensor) -> np.ndarray:
    """Each true class's row as fractions, so a class with 5 images is as visible as one with 5000."""
    counts = matrix.double().cpu().numpy()
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _heatmap_layout(num_classes: int) -> tuple[float, float, float]:
    """(figure height in inches, tick label font size, cell font size): grows and shrinks with C
    so that 50 classes still fit a readable picture."""
    side = max(5.0, 2.5 + 0.3 * num_classes)  # a cell stays >= 0.3 in, room for a 7 pt label
    tick_font = max(7.0, min(10.0, 160.0 / max(num_classes, 1)))
    cell_font = max(6.0, min(10.0, 150.0 / max(num_classes, 1)))
    return side, tick_font, cell_font


@functools.cache
def _text_measurer() -> RendererAgg:
    """A 1x1 Agg renderer at 72 dpi: it measures text in points as Agg will draw it."""
    return RendererAgg(1, 1, 72)


def _text_size(text: str, size: float | str) -> tuple[float, float]:
    """(width, height) in inches of one line of text, measured without drawing a figure."""
    properties = FontProperties(size=size)
    width, height, _ = _text_measurer().get_text_width_height_descent(
        text, properties, ismath=cbook.is_math_text(text)
    )
    return width / 72, max(height, properties.get_size_in_points() * 1.2) / 72


def _tick_space(axis: str) -> float:
    """Inches between an axes' edge and its tick labels: the tick, then its pad."""
    return (rcParams[f"{axis}tick.major.size"] + rcParams[f"{axis}tick.major.pad"]) / 72


HEATMAP_PAD = 0.1  # inches of white around the figure's outermost text
COLORBAR_GAP = 0.12  # inches between the heatmap and its colour bar


@dataclass(frozen=True)
class _HeatmapBoxes:
    """Where the heatmap and its colour bar go, in inches from the figure's bottom left corner.
    The margins come from measuring the labels' text, so that none is clipped, rather than from
    a layout engine, which draws the whole figure once more to find them."""

    width: float
    height: float
    heatmap: tuple[float, float, float, float]  # left, bottom, width, height
    colorbar: tuple[float, float, float, float]

    def fraction(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in figure fractions, as add_axes takes it."""
        left, bottom, width, height = box
        return left / self.width, bottom / self.height, width / self.width, height / self.height


def _heatmap_boxes(
    class_names: Sequence[str], height: float, tick_font: float, rotation: float, title: str
) -> _HeatmapBoxes:
    """The square heatmap as large as a figure `height` inches high leaves it once its tick labels
    (x ones turned by `rotation` degrees), axis labels and title have their room, but at least
    0.25 in a cell (the figure grows instead); the colour bar to its right. The figure is as wide
    as that needs."""
    label_height = _text_size("predicted", rcParams["axes.labelsize"])[1] + rcParams["axes.labelpad"] / 72
    name_width = max((_text_size(name, tick_font)[0] for name in class_names), default=0.0)
    name_height = _text_size("Mg", tick_font)[1]
    turn = math.radians(rotation)
    x_names = name_width * math.sin(turn) + name_height * math.cos(turn)  # below the heatmap
    title_width, title_height = _text_size(title, rcParams["axes.titlesize"])
    bottom = HEATMAP_PAD + label_height + x_names + _tick_space("x")
    top = HEATMAP_PAD + title_height + rcParams["axes.titlepad"] / 72
    side = max(height - bottom - top, 0.25 * len(class_names), 1.0)
    cell = side / max(len(class_names), 1)
    # The first x label, anchored at the first cell's centre, reaches left of the heatmap.
    x_overhang = name_width * math.cos(turn) + name_height * math.sin(turn) - cell / 2
    left = HEATMAP_PAD + max(label_height + name_width + _tick_space("y"), x_overhang)
    bar_width = max(0.1, side / 40)
    bar_text = max(_text_size(f"{tick:.1f}", rcParams["ytick.labelsize"])[0] for tick in (0.0, 0.5, 1.0))
    right = COLORBAR_GAP + bar_width + _tick_space("y") + bar_text + label_height + HEATMAP_PAD
    # The title is centred on the heatmap: widen the margins it would overflow.
    left = max(left, HEATMAP_PAD + title_width / 2 - side / 2)
    right = max(right, HEATMAP_PAD + title_width / 2 - side / 2)
    return _HeatmapBoxes(
        width=left + side + right,
        height=bottom + side + top,
        heatmap=(left, bottom, side, side),
        colorbar=(left + side + COLORBAR_GAP, bottom, bar_width, side),
    )


def _draw_confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """Heatmap coloured by row fraction, counts in the cells while they still fit."""
    num_classes = len(class_names)
    height, tick_font, cell_font = _heatmap_layout(num_classes)
    rotation = 45 if num_classes <= 10 else 90
    title = "Confusion matrix (colour: share of each true class)"
    boxes = _heatmap_boxes(class_names, height, tick_font, rotation, title)
    fractions = _row_normalised(matrix)
    figure = Figure(figsize=(boxes.width, boxes.height))
    ax = figure.add_axes(boxes.fraction(boxes.heatmap))
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, cax=figure.add_axes(boxes.fraction(boxes.colorbar)))
    colorbar.set_label("fraction of the true class")
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, labels=list(class_names), fontsize=tick_font)
    ax.set_yticks(ticks, labels=list(class_names), fontsize=tick_font)
    for label in ax.get_xticklabels():
        label.set(rotation=rotation, ha="right", rotation_mode="anchor")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        counts = matrix.cpu().numpy()
        for row in range(num_classes):
            for col in range(num_classes):
                colour = "white" if fractions[row, col] > 0.5 else "black"
                ax.text(
                    col,
                    row,
                    str(int(counts[row, col])),
                    ha="center",
                    va="center",
                    fontsize=cell_font,
                    color=colour,
                )
    return figure


def write_confusion_matrix(
    matrix: torch.Tensor, class_names: list[str], directory: str | Path
) -> tuple[Path, Path]:
    """Write `confusion_matrix.csv` (for tools) and `confusion_matrix.png` (for people) into
    `directory`. Returns (csv_path, png_path)."""
    check_names(matrix, class_names)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory / "confusion_matrix.csv"
    counts = matrix.long().cpu().tolist()
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, counts, strict=True):
            writer.writerow([name, *row])
    png_path = directory / "confusion_matrix.png"
    _draw_confusion_matrix(matrix, class_names).savefig(png_path, dpi=100)
    return csv_path, png_path

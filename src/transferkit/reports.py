"""Evaluation reports written next to a run: confusion matrix, per-class metrics and the most
confident mistakes. Pure functions over tensors and lists, so they can be tested without a model."""

from __future__ import annotations

import csv
import functools
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rich
import torch
from matplotlib import cbook, rcParams
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from rich.table import Table
from torchmetrics.functional.classification import multiclass_confusion_matrix

from transferkit.data.images import load_rgb
from transferkit.errors import DataError

REPORT_COLUMNS = ("class", "precision", "recall", "f1", "support")
MAX_ANNOTATED_CLASSES = 20  # above this, numbers in the heatmap cells are unreadable
GRID_COLUMNS = 4


# --- confusion matrix ---------------------------------------------------------------------------


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted (torchmetrics' convention)."""
    matrix = multiclass_confusion_matrix(
        preds.detach().cpu().long(), labels.detach().cpu().long(), num_classes=num_classes
    )
    return matrix.long()


def _check_names(matrix: torch.Tensor, class_names: Sequence[str]) -> None:
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
    _check_names(matrix, class_names)
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


# --- per-class metrics --------------------------------------------------------------------------


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """0/0 is 0, as sklearn's zero_division=0: a class never predicted has no precision to speak of."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def per_class_report(matrix: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, f1 and support per class, then "macro avg" and "weighted avg" rows.

    The macro average skips classes that are neither in the labels nor in the predictions
    (as sklearn's classification_report and torchmetrics do): a class missing from a small test
    split says nothing about the model and must not drag the average to zero."""
    _check_names(matrix, class_names)
    counts = matrix.double().cpu().numpy()
    true_positives = np.diag(counts).copy()
    predicted = counts.sum(axis=0)
    support = counts.sum(axis=1)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * true_positives, predicted + support)  # = 2pr/(p+r), and 0 when both are 0
    rows = [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    ]
    seen = (predicted + support) > 0
    total = int(support.sum())
    rows.append(_summary_row("macro avg", precision, recall, f1, seen.astype(float), total))
    rows.append(_summary_row("weighted avg", precision, recall, f1, support, total))
    return rows


def _summary_row(
    name: str, precision: np.ndarray, recall: np.ndarray, f1: np.ndarray, weights: np.ndarray, total: int
) -> dict[str, Any]:
    """A weighted mean of each metric; no weight at all (empty evaluation) gives zeros."""
    weight_sum = float(weights.sum())

    def mean(values: np.ndarray) -> float:
        return float((values * weights).sum() / weight_sum) if weight_sum > 0 else 0.0

    return {
        "class": name,
        "precision": mean(precision),
        "recall": mean(recall),
        "f1": mean(f1),
        "support": total,
    }


def write_per_class_report(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """The report as CSV, floats to 4 decimals so diffs between runs stay readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(REPORT_COLUMNS)
        for row in rows:
            writer.writerow(
                [row["class"], *(f"{row[key]:.4f}" for key in REPORT_COLUMNS[1:4]), int(row["support"])]
            )
    return path


def print_per_class_report(rows: list[dict[str, Any]], title: str = "Per-class report") -> None:
    """The report as a table on the console, the averages set apart below the classes."""
    table = Table(title=title)
    table.add_column("class", style="bold")
    for column in REPORT_COLUMNS[1:]:
        table.add_column(column, justify="right")
    for row in rows:
        if row["class"] == "macro avg":
            table.add_section()
        table.add_row(
            str(row["class"]), *(f"{row[key]:.4f}" for key in REPORT_COLUMNS[1:4]), str(row["support"])
        )
    rich.get_console().print(table)


# --- misclassified images -----------------------------------------------------------------------


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

"""Precision, recall, f1 and support per class, as a CSV and a printed table."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rich
import torch
from rich.table import Table

from transferkit.reports.confusion import check_names

REPORT_COLUMNS = ("class", "precision", "recall", "f1", "support")


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """0/0 is 0, as sklearn's zero_division=0: a class never predicted has no precision to speak of."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def per_class_report(matrix: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, f1 and support per class, then "macro avg" and "weighted avg" rows.

    The macro average skips classes that are neither in the labels nor in the predictions
    (as sklearn's classification_report and torchmetrics do): a class missing from a small test
    split says nothing about the model and must not drag the average to zero."""
    check_names(matrix, class_names)
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


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A report's rows under its header, as CSV (its folder made if need be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_per_class_report(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """The report as CSV, floats to 4 decimals so diffs between runs stay readable."""
    cells = (
        [row["class"], *(f"{row[key]:.4f}" for key in REPORT_COLUMNS[1:4]), int(row["support"])]
        for row in rows
    )
    return write_csv(path, REPORT_COLUMNS, cells)


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

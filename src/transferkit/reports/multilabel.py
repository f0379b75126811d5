"""The per-class report of a multi-label model: each class's threshold, precision, recall and F1
at it, average precision, AUROC and support, then their macro average; as a CSV and a table.

A multi-label evaluation has no confusion matrix and no "most confident mistakes": an image
has any number of true and predicted labels, so there is no one true class to put against one
predicted class, and each class is a yes/no decision of its own. Its errors are per class,
which is what this report shows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import rich
import torch
from rich.table import Table

from transferkit.model.multilabel import per_class_measures
from transferkit.reports.per_class import write_csv

REPORT_COLUMNS = ("class", "threshold", "precision", "recall", "f1", "ap", "auroc", "support")
MEASURES = REPORT_COLUMNS[1:-1]  # the float columns
MACRO = "macro avg"


def multilabel_report(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, class_names: list[str]
) -> list[dict[str, Any]]:
    """One row per class, then the "macro avg" row.

    `ap` is NaN for a class without a positive image, `auroc` also for one without a negative
    image: the data cannot measure them. The macro row averages what `multilabel_scores`
    averages: precision, recall and F1 over the classes that are in the labels or the
    predictions, `ap` (the mAP) and `auroc` over the classes that measure them (NaN where none
    does); its support is the number of labels, and it has no threshold (NaN)."""
    if len(class_names) != probs.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {probs.shape[1]} scores per image.")
    measures = {k: v.double() for k, v in per_class_measures(probs, targets, thresholds).items()}
    measures["threshold"] = thresholds.detach().double().cpu()
    rows = []
    for c, name in enumerate(class_names):
        values = {k: float(measures[k][c]) for k in MEASURES}
        rows.append({"class": name, **values, "support": int(measures["support"][c])})
    seen = (measures["support"] + measures["predicted"]) > 0
    macro: dict[str, Any] = {"class": MACRO, "threshold": math.nan}
    for key in ("precision", "recall", "f1"):
        macro[key] = _mean(measures[key][seen])
    for key in ("ap", "auroc"):
        macro[key] = _mean(measures[key])
    macro["support"] = int(measures["support"].sum())
    return [*rows, macro]


def _mean(values: torch.Tensor) -> float:
    """The mean of the values that are not NaN; NaN when there are none."""
    values = values[~values.isnan()]
    return float(values.mean()) if len(values) else math.nan


def without_positives(rows: list[dict[str, Any]]) -> list[str]:
    """The classes of the report that no image of the evaluation has."""
    return [row["class"] for row in rows if row["class"] != MACRO and row["support"] == 0]


def _formatted(value: float, missing: str) -> str:
    return missing if math.isnan(value) else f"{value:.4f}"


def write_multilabel_report(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """The report as CSV, floats to 4 decimals; what cannot be measured is an empty cell."""
    cells = ([row["class"], *(_formatted(row[k], "") for k in MEASURES), row["support"]] for row in rows)
    return write_csv(path, REPORT_COLUMNS, cells)


def print_multilabel_report(rows: list[dict[str, Any]], title: str = "Per-class report") -> None:
    """The report as a table on the console, the macro average set apart; "n/a" where the data
    cannot measure a value."""
    table = Table(title=title)
    table.add_column("class", style="bold")
    for column in REPORT_COLUMNS[1:]:
        table.add_column(column, justify="right")
    for row in rows:
        macro = row["class"] == MACRO
        if macro:
            table.add_section()
        cells = [_formatted(row[k], "" if macro and k == "threshold" else "n/a") for k in MEASURES]
        table.add_row(str(row["class"]), *cells, str(row["support"]))
    rich.get_console().print(table)

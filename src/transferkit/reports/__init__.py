"""Evaluation reports written next to a run: confusion matrix, per-class metrics and the most
confident mistakes; for multi-label models, the per-class report with thresholds, AP and AUROC.
Pure functions over tensors and lists, so they can be tested without a model."""

from transferkit.reports.confusion import confusion_matrix, write_confusion_matrix
from transferkit.reports.mistakes import most_confident_mistakes, write_misclassified_grid
from transferkit.reports.multilabel import (
    multilabel_report,
    print_multilabel_report,
    without_positives,
    write_multilabel_report,
)
from transferkit.reports.per_class import per_class_report, print_per_class_report, write_per_class_report

__all__ = [
    "confusion_matrix",
    "most_confident_mistakes",
    "multilabel_report",
    "per_class_report",
    "print_multilabel_report",
    "print_per_class_report",
    "without_positives",
    "write_confusion_matrix",
    "write_misclassified_grid",
    "write_multilabel_report",
    "write_per_class_report",
]

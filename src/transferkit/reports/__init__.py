"""Evaluation reports written next to a run: confusion matrix, per-class metrics and the most
confident mistakes. Pure functions over tensors and lists, so they can be tested without a model."""

from transferkit.reports.confusion import confusion_matrix, write_confusion_matrix
from transferkit.reports.mistakes import most_confident_mistakes, write_misclassified_grid
from transferkit.reports.per_class import per_class_report, print_per_class_report, write_per_class_report

__all__ = [
    "confusion_matrix",
    "most_confident_mistakes",
    "per_class_report",
    "print_per_class_report",
    "write_confusion_matrix",
    "write_misclassified_grid",
    "write_per_class_report",
]

"""Multi-label measures: the decision threshold of each class tuned on val, and the metrics at
them (mean average precision, micro and macro F1, per-class AUROC), as numbers and per class.

An image's scores are independent sigmoids, one per class; a class is predicted when its score
is at or above its threshold. Averages over classes leave out the classes the data cannot
measure: average precision needs a positive image, AUROC a positive and a negative one, and a
class with no positive image and none predicted has no F1 to speak of (as in the single-label
per-class report); the report says which.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multilabel_auroc, multilabel_average_precision
from torchmetrics.utilities import dim_zero_cat

from transferkit.model.decisions import DEFAULT_THRESHOLD, decide


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class, the threshold that maximises F1 on (`probs`, `targets`), both (N, C).

    Each class's cut falls halfway between the lowest score it keeps and the next score below,
    so scores a hair apart on another runtime (ONNX, bf16) decide the same way. A class with no
    positive image keeps DEFAULT_THRESHOLD."""
    thresholds = torch.full((probs.shape[1],), DEFAULT_THRESHOLD)
    for c in range(probs.shape[1]):
        positives = int(targets[:, c].sum())
        if positives == 0:
            continue
        scores, order = probs[:, c].double().sort(descending=True)
        hits = targets[order, c].double().cumsum(0)
        last_of_value = torch.ones_like(scores, dtype=torch.bool)  # cut only between distinct scores
        last_of_value[:-1] = scores[:-1] != scores[1:]
        kept = torch.arange(1, len(scores) + 1, dtype=torch.float64)
        f1 = torch.where(
            last_of_value, 2 * hits / (kept + positives), torch.tensor(-1.0, dtype=torch.float64)
        )
        k = int(f1.argmax())
        below = scores[k + 1] if k + 1 < len(scores) else scores[k] / 2
        thresholds[c] = float((scores[k] + below) / 2)
    return thresholds


@contextmanager
def _quiet() -> Iterator[None]:
    """torchmetrics warns of every class without positives; the averages leave those out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(positive|negative) samples", category=UserWarning)
        yield


def per_class_measures(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per class (C,): precision, recall, f1 (at the thresholds), ap, auroc (NaN where the data
    cannot measure it), support (positive images) and predicted (images predicted positive)."""
    targets = targets.long()
    predicted = decide(probs, thresholds)
    tp = (predicted * targets).sum(0).double()
    n_pred, support = predicted.sum(0).double(), targets.sum(0).double()
    negatives = len(targets) - support
    num_labels = probs.shape[1]
    with _quiet():
        ap = multilabel_average_precision(probs.float(), targets, num_labels, average=None).double()
        auroc = multilabel_auroc(probs.float(), targets, num_labels, average=None).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "precision": torch.where(n_pred > 0, tp / n_pred.clamp(min=1), 0.0),
        "recall": torch.where(support > 0, tp / support.clamp(min=1), 0.0),
        "f1": torch.where(n_pred + support > 0, 2 * tp / (n_pred + support).clamp(min=1), 0.0),
        "ap": torch.where(support > 0, ap, nan),
        "auroc": torch.where((support > 0) & (negatives > 0), auroc, nan),
        "support": support,
        "predicted": n_pred,
    }


def multilabel_scores(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """`map`, `auroc` (macro over the classes they can measure), `f1_micro` and `f1_macro` at
    the thresholds; an average over no class at all is 0."""
    measures = per_class_measures(probs, targets, thresholds)
    predicted = decide(probs, thresholds)
    tp = float((predicted * targets.long()).sum())
    micro_denominator = float(predicted.sum() + targets.sum())
    seen = (measures["support"] + measures["predicted"]) > 0

    def mean(values: torch.Tensor) -> torch.Tensor:
        values = values[~values.isnan()]
        return values.mean().float() if len(values) else torch.tensor(0.0)

    return {
        f"{prefix}map": mean(measures["ap"]),
        f"{prefix}auroc": mean(measures["auroc"]),
        f"{prefix}f1_micro": torch.tensor(2 * tp / micro_denominator if micro_denominator else 0.0),
        f"{prefix}f1_macro": mean(measures["f1"][seen]),
    }


class ScoresAndTargets(Metric):
    """Every image's scores and labels of an evaluation, gathered from all DDP ranks: mean
    average precision and threshold tuning need them all, not running sums."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach().long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.probs).cpu(), dim_zero_cat(self.targets).cpu()

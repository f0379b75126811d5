"""Likely wrong labels: a linear probe on the cached features predicts every image from folds it
was not trained on, and cleanlab (confident learning) picks the images whose given label the
out-of-fold probabilities most doubt.

Every split takes part: a wrong label in val or test misleads the measure as much as one in
train misleads training. The probe is a logistic regression on L2-normalised features, one per
class (one-vs-rest) for multi-label data, in `folds` stratified folds seeded by `seed`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from transferkit.audit.items import Item
from transferkit.errors import DataError
from transferkit.extras import require

MULTILABEL_THRESHOLD = 0.5  # a class is suggested when the probe gives it at least this


@dataclass(frozen=True)
class LabelIssue:
    index: int  # into the audit's items
    suggested: int | tuple[int, ...]  # the probe's class (multi-label: 0/1 per class)
    score: float  # cleanlab's label quality score: 0 to 1, lower is more suspect


def check_folds(items: Sequence[Item], class_names: list[str], folds: int) -> None:
    """Every class needs an image in every fold (stratified), so at least `folds` of them."""
    if folds < 2:
        raise DataError(f"audit.folds={folds} must be 2 or more.")
    if items and isinstance(items[0].label, tuple):
        if len(items) < folds:
            raise DataError(f"{len(items)} images are fewer than audit.folds={folds}; lower audit.folds.")
        return
    counts = np.bincount([item.label for item in items], minlength=len(class_names))
    small = [f"{name} ({int(n)})" for name, n in zip(class_names, counts, strict=True) if n < folds]
    if small:
        raise DataError(
            f"Class(es) with fewer images than audit.folds={folds}, so the label check cannot hold "
            f"one out in every fold: {', '.join(small)}. Set audit.folds={max(2, int(counts.min()))} "
            "(at least 2) or add images."
        )


def out_of_fold_probs(
    features: torch.Tensor, labels: np.ndarray, folds: int, seed: int, c: float, multilabel: bool
) -> np.ndarray:
    """(N, C) probabilities of each image from a probe that never saw it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier

    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    probe = LogisticRegression(C=c, max_iter=1000)
    if multilabel:
        splitter = KFold(folds, shuffle=True, random_state=seed)
        model = OneVsRestClassifier(probe)
    else:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        model = probe
    with warnings.catch_warnings():  # a fold where a class has no positive: the probe says so itself
        warnings.filterwarnings("ignore", message=".*Label not .* is present in all training examples")
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        return cross_val_predict(model, x, labels, cv=splitter, method="predict_proba")


def find_label_issues(
    items: Sequence[Item],
    features: torch.Tensor,
    class_names: list[str],
    folds: int = 5,
    seed: int = 42,
    c: float = 100.0,
) -> list[LabelIssue]:
    """The images cleanlab flags, most suspect first (lowest self-confidence in the given label)."""
    require("cleanlab", extra="audit", feature="audit.py")
    check_folds(items, class_names, folds)
    multilabel = bool(items) and isinstance(items[0].label, tuple)
    if multilabel:
        from cleanlab.multilabel_classification.filter import find_label_issues as find
        from cleanlab.multilabel_classification.rank import get_label_quality_scores as scores

        targets = np.array([item.label for item in items], dtype=int)
        given: list | np.ndarray = [list(np.flatnonzero(row)) for row in targets]
    else:
        from cleanlab.filter import find_label_issues as find
        from cleanlab.rank import get_label_quality_scores as scores

        targets = given = np.array([item.label for item in items], dtype=int)
    probs = out_of_fold_probs(features, targets, folds, seed, c, multilabel)
    flagged = find(given, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = scores(given, probs)
    issues = []
    for index in flagged.tolist():
        if multilabel:
            suggested: int | tuple[int, ...] = tuple(int(p >= MULTILABEL_THRESHOLD) for p in probs[index])
        else:
            suggested = int(probs[index].argmax())
        issues.append(LabelIssue(index, suggested, round(float(quality[index]), 4)))
    return issues

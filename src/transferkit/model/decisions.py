"""A multi-label model's decision: a class is predicted where its score reaches its threshold.
Apart from `model.multilabel` (which tunes the thresholds with torchmetrics) so predict and serve
apply them without importing torchmetrics."""

from __future__ import annotations

import torch

DEFAULT_THRESHOLD = 0.5  # before any tuning, and for a class val has no positive image of


def decide(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, C) 0/1: each class predicted where its score reaches its threshold."""
    return (probs >= thresholds.to(probs.device)).long()

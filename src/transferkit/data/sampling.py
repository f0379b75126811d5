"""Class balance for imbalanced training sets: weights for the loss, or a re-weighted sampler."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import WeightedRandomSampler

from transferkit.errors import ConfigError

BALANCE_MODES = ("none", "weights", "sampler")


def balance_mode(balance: str | None) -> str:
    """Check `data.balance`; null means none, as in the YAML files."""
    if balance is None:
        return "none"
    if isinstance(balance, str) and balance in BALANCE_MODES:
        return balance
    raise ConfigError(f"data.balance={balance!r} is not a mode; use one of {', '.join(BALANCE_MODES)}.")


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """scikit-learn's "balanced" weights, n_samples / (n_classes * count): every class then
    weighs as much in the loss as if the classes were the same size."""
    total, n_classes = sum(counts), len(counts)
    return [total / (n_classes * count) for count in counts]


def balanced_sampler(labels: Sequence[int], seed: int | None) -> WeightedRandomSampler:
    """Draw an epoch's worth of samples (with replacement), each class equally often on average.

    Seeded so a run draws the same sequence again; a null seed draws a fresh one.
    """
    counts = Counter(labels)
    weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)

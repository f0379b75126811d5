"""Class balance for imbalanced training sets: weights for the loss, or a re-weighted sampler."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

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


def balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample draw weights under which every class comes up equally often on average."""
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)


def epoch_seed(seed: int, epoch: int, index: int = -1) -> int:
    """A seed for one epoch (and one sample of it): a pure function, so a run resumed mid-epoch
    draws what the uninterrupted run drew, whichever process draws it."""
    return (int(seed) * 1_000_003 + epoch * 7_919 + index + 1) % (2**63)


class EpochSampler(Sampler[int]):
    """The training order of each epoch as a function of (seed, epoch): a shuffle, or with
    `weights` a draw with replacement (class balancing).

    It yields `epoch * n + index`, so the dataset (in any worker) knows the epoch too and can
    seed each sample's augmentation by (seed, epoch, index). `skip` leaves out the first samples
    of the next epoch it serves: those a run interrupted mid-epoch had already trained on.
    """

    def __init__(self, n: int, seed: int | None, weights: torch.Tensor | None = None, skip: int = 0) -> None:
        self.n, self.weights, self.skip = n, weights, skip
        self.seed = int(seed) if seed is not None else int(torch.randint(2**31, ()))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        skip, self.skip = self.skip, 0
        offset = self.epoch * self.n
        return iter((order[skip:] + offset).tolist())

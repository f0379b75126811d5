"""Class balance for imbalanced training sets: weights for the loss, or a re-weighted sampler."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

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


def positive_weights(positives: Sequence[int], total: int) -> list[float]:
    """BCEWithLogitsLoss's `pos_weight` for multi-label data, negatives / positives per class:
    a class's few present images then weigh as much in its loss as its many absent ones. A class
    present in every image (or none) has nothing to balance: 1."""
    return [(total - count) / count if 0 < count < total else 1.0 for count in positives]


def balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample draw weights under which every class comes up equally often on average."""
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)


def epoch_seed(seed: int, epoch: int, index: int = -1) -> int:
    """A seed for one epoch (and one sample of it): a pure function, so a run resumed mid-epoch
    draws what the uninterrupted run drew, whichever process draws it."""
    return (int(seed) * 1_000_003 + epoch * 7_919 + index + 1) % (2**63)


class EpochSampler(DistributedSampler):
    """The training order of each epoch as a function of (seed, epoch): a shuffle, or with
    `weights` a draw with replacement (class balancing).

    It yields `epoch * n + index`, so the dataset (in any worker) knows the epoch too and can
    seed each sample's augmentation by (seed, epoch, index).

    Under DDP, rank r of `num_replicas` takes positions r, r + W, ... of that one order, which
    wraps round to give every rank as many samples (DDP steps all ranks together): the ranks
    together train what one process would. Being a DistributedSampler, Lightning uses it as it
    is rather than wrapping it in a sampler of its own.

    `skip` leaves out the first samples of that global order in the next epoch served: those a
    run interrupted mid-epoch had already trained on, on all ranks. `len()` stays the epoch's
    length, as Lightning expects of a resumed loader: it counts the batches done before the
    interruption itself. `epoch` is where it starts, as a loader with workers draws the order
    before Lightning calls `set_epoch`.
    """

    def __init__(
        self,
        n: int,
        seed: int | None,
        weights: torch.Tensor | None = None,
        skip: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        epoch: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.n, self.weights, self.skip = n, weights, skip
        self.seed = int(seed) if seed is not None else int(torch.randint(2**31, ()))
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, epoch
        self.shuffle, self.drop_last = True, False
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        skip, self.skip = self.skip, 0
        left = math.ceil(max(self.n - skip, 0) / self.num_replicas)  # per rank: all ranks step together
        positions = torch.arange(left) * self.num_replicas + skip + self.rank
        keys = order[positions % max(self.n, 1)] + self.epoch * self.n
        # Chunk by chunk: a million keys as Python ints at once take tens of MB.
        return itertools.chain.from_iterable(chunk.tolist() for chunk in keys.split(65_536))

"""Head epochs at memory speed: cached features served a whole batch at a time.

A loader over images runs `__getitem__` per sample and collates; over cached features that is
most of an epoch's cost (a million rows: a million Python calls for seconds of arithmetic). Here
the sampler yields lists of keys and the loader (`batch_size=None`, no workers, no pinned
copies) hands each list to `FeatureSet`, which slices the rows out of its memory map at once.
The keys are those the image loader would use, in the same order, so a cached epoch trains on
the same batches (and a resume, a class-balancing sampler or DDP's shares still apply).

How big the head's batches are (`head_batch_size`): up to `features.batch_size`, as large as
keeps an epoch at `HEAD_STEPS` optimizer steps, and never smaller than `data.batch_size`. A
small dataset therefore trains exactly as on images; only past `HEAD_STEPS * data.batch_size`
rows does the batch grow, where per-step overhead would dominate. The learning rate is not
scaled (docs/speed.md says when and how to raise it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sized

from torch.utils.data import DataLoader, Dataset, DistributedSampler

HEAD_STEPS = 256  # steps a head epoch keeps once its batch grows past data.batch_size


def head_batch_size(rows: int, data_batch_size: int, largest: int) -> int:
    """The batch a head trains in on `rows` cached training rows (see the module's docstring)."""
    return max(data_batch_size, min(largest, math.ceil(rows / HEAD_STEPS)))


class KeyBatches(DistributedSampler):
    """`keys` (a sampler, or any sized iterable of keys) in lists of `batch_size`, the last one
    shorter. A DistributedSampler, so Lightning uses it as it is under DDP instead of wrapping
    it; `set_epoch` reaches the sampler inside."""

    def __init__(self, keys: Iterable[int], batch_size: int) -> None:
        self.keys, self.batch_size = keys, batch_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.keys, "set_epoch"):
            self.keys.set_epoch(epoch)

    def __len__(self) -> int:
        assert isinstance(self.keys, Sized)
        return math.ceil(len(self.keys) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        keys = iter(self.keys)  # batch by batch: a million keys are never held at once
        while batch := list(itertools.islice(keys, self.batch_size)):
            yield batch


def feature_loader(dataset: Dataset, keys: Iterable[int] | None, batch_size: int) -> DataLoader:
    """Whole batches of `dataset` (a FeatureSet) by `keys` (None: every row in order)."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=KeyBatches(range(len(dataset)) if keys is None else keys, batch_size),
    )

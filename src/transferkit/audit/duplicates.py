"""Exact duplicates (the same bytes) and near duplicates (the same picture resized, recompressed
or slightly cropped), as pairs; pairs across splits (leaks: a val or test image the model has
trained on) come first."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from transferkit.audit.files import THUMB, FileFacts
from transferkit.audit.items import SPLIT_ORDER, Item
from transferkit.audit.similarity import normalized, similar_pairs


@dataclass(frozen=True)
class Pair:
    a: int  # indices into the audit's items; a's split comes first in train, val, test
    b: int
    kind: str  # exact or near
    feature_similarity: float  # cosine similarity of the backbone's features
    pixel_similarity: float  # correlation of the 32x32 grey thumbnails (0 when either is flat)

    @property
    def similarity(self) -> float:
        """1.0 for the same bytes; else the stronger of the two signals."""
        return 1.0 if self.kind == "exact" else max(self.feature_similarity, self.pixel_similarity)


def exact_groups(hashes: Sequence[str | None]) -> list[list[int]]:
    """Indices of files with the same content hash, in groups of two or more (None: unreadable)."""
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(hashes):
        if digest is not None:
            groups.setdefault(digest, []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def thumbnails(facts: Sequence[FileFacts | None]) -> torch.Tensor:
    """(N, THUMB * THUMB) unit thumbnails; zeros for a flat or unreadable picture (similar to nothing)."""
    rows = np.zeros((len(facts), THUMB * THUMB), dtype=np.float32)
    for index, fact in enumerate(facts):
        if fact is not None and fact.thumbnail is not None:
            rows[index] = fact.thumbnail
    return torch.from_numpy(rows)


def oriented(i: int, j: int, items: Sequence[Item]) -> tuple[int, int]:
    """(a, b) with a's split first in train, val, test (the copy to drop is then a's); within a
    split, the earlier file first."""
    key = lambda k: (SPLIT_ORDER.index(items[k].split), str(items[k].path))  # noqa: E731
    return (i, j) if key(i) <= key(j) else (j, i)


def find_duplicates(
    items: Sequence[Item],
    features: torch.Tensor,
    facts: Sequence[FileFacts | None],
    feature_threshold: float,
    pixel_threshold: float,
    per_row: int = 10,
    max_share: float = 1.0,
) -> tuple[list[Pair], float]:
    """Every exact pair (each file of a group against the group's first) and every near pair
    whose features or thumbnails pass their threshold, in report order (`ordered`); and the
    feature threshold used.

    Where the features alone would pair off more than `max_share` of the images, the pictures of
    this data are alike, not copied (MNIST's digits reach 0.98 between different writers): the
    feature threshold is raised until they pair off `max_share`. Exact and thumbnail matches
    are kept whatever it does."""
    features, thumbs = normalized(features), thumbnails(facts)
    found: dict[tuple[int, int], Pair] = {}
    for group in exact_groups([f.sha256 if f is not None else None for f in facts]):
        for other in group[1:]:
            a, b = oriented(group[0], other, items)
            found[(a, b)] = Pair(a, b, "exact", 1.0, 1.0)
    confirmed = {(i, j) for i, j, _ in similar_pairs(thumbs, pixel_threshold, per_row)}
    confirmed |= {tuple(sorted(pair)) for pair in found}
    by_features = [(i, j, s) for i, j, s in similar_pairs(features, feature_threshold, per_row)]
    threshold = crowded_threshold(
        [(i, j, s) for i, j, s in by_features if (i, j) not in confirmed],
        len(items),
        max_share,
        feature_threshold,
    )
    for i, j in confirmed | {(i, j) for i, j, s in by_features if s >= threshold}:
        a, b = oriented(i, j, items)
        if (a, b) in found:
            continue
        feature = float(features[a] @ features[b])
        pixel = float(thumbs[a] @ thumbs[b])
        found[(a, b)] = Pair(a, b, "near", round(feature, 4), round(pixel, 4))
    return ordered(list(found.values()), items), threshold


def crowded_threshold(pairs: list[tuple[int, int, float]], n: int, max_share: float, floor: float) -> float:
    """`floor`, or the similarity above which the most similar `pairs` pair off at most
    `max_share` of the `n` images."""
    involved: set[int] = set()
    for i, j, similarity in sorted(pairs, key=lambda p: -p[2]):
        involved |= {i, j}
        if len(involved) > max_share * n:
            return max(floor, math.nextafter(similarity, 2.0))
    return floor


def is_leak(pair: Pair, items: Sequence[Item]) -> bool:
    return items[pair.a].split != items[pair.b].split


def ordered(pairs: list[Pair], items: Sequence[Item]) -> list[Pair]:
    """Leaks across splits first, then exact before near, most similar first; ties by path."""
    return sorted(
        pairs,
        key=lambda p: (
            not is_leak(p, items),
            p.kind != "exact",
            -p.similarity,
            str(items[p.a].path),
            str(items[p.b].path),
        ),
    )

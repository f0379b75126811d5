"""Outliers: images far from every class in feature space (the wrong kind of picture, a blank
or corrupt-looking one, another dataset's image), not images nearer another class (those are
label issues). Distance: 1 - the cosine similarity to the nearest class centroid; an outlier's
distance lies `z` robust standard deviations (1.4826 x the median absolute deviation) above the
median."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transferkit.audit.items import Item
from transferkit.audit.similarity import normalized

MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class Outlier:
    index: int
    distance: float  # to the nearest class centroid, 0 to 2
    z: float  # robust z-score of the distance


def centroids(features: torch.Tensor, items: Sequence[Item], num_classes: int) -> torch.Tensor:
    """(C, D) unit mean feature of each class (multi-label: of the images that have it)."""
    if items and isinstance(items[0].label, tuple):
        members = torch.tensor([item.label for item in items], dtype=torch.float32)
    else:
        labels = torch.tensor([item.label for item in items], dtype=torch.long)
        members = torch.nn.functional.one_hot(labels, num_classes).float()
    sums = members.T @ features
    return normalized(sums / members.sum(0).clamp(min=1)[:, None])


def robust_z(values: torch.Tensor) -> torch.Tensor:
    median = values.median()
    spread = MAD_TO_STD * (values - median).abs().median()
    return (values - median) / spread.clamp(min=1e-6)


def find_outliers(
    items: Sequence[Item], features: torch.Tensor, num_classes: int, z: float = 3.5
) -> list[Outlier]:
    """Images whose distance to the nearest centroid has a robust z-score of `z` or more, farthest first."""
    if not items:
        return []
    features = normalized(features)
    distance = 1.0 - (features @ centroids(features, items, num_classes).T).max(1).values
    scores = robust_z(distance)
    order = torch.argsort(distance, descending=True, stable=True)
    return [
        Outlier(int(i), round(float(distance[i]), 4), round(float(scores[i]), 2))
        for i in order.tolist()
        if scores[i] >= z
    ]

"""Class counts and balance per split, and the images' sizes, modes and formats as their headers
give them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from transferkit.audit.files import FileFacts
from transferkit.audit.items import SPLIT_ORDER, Item


def class_counts(items: Sequence[Item], class_names: list[str]) -> dict[str, dict[str, int]]:
    """{class: {split: images}} (multi-label: the images that have the class) for the splits present."""
    splits = [s for s in SPLIT_ORDER if any(item.split == s for item in items)]
    counts = {name: dict.fromkeys(splits, 0) for name in class_names}
    for item in items:
        present = (
            [c for c, on in enumerate(item.label) if on] if isinstance(item.label, tuple) else [item.label]
        )
        for c in present:
            counts[class_names[c]][item.split] += 1
    return counts


def imbalance(counts: dict[str, dict[str, int]], split: str = "train") -> float | None:
    """The largest class's training images over the smallest's (1.0: balanced; None: a class has none)."""
    values = [per_split.get(split, 0) for per_split in counts.values()]
    return round(max(values) / min(values), 2) if values and min(values) > 0 else None


def image_summary(facts: Sequence[FileFacts | None]) -> dict[str, Any]:
    """Width and height (min, median, max), and how many images have each mode and format."""
    read = [f for f in facts if f is not None]
    if not read:
        return {"images": 0}
    widths = np.array([f.width for f in read])
    heights = np.array([f.height for f in read])
    return {
        "images": len(read),
        "width": {"min": int(widths.min()), "median": int(np.median(widths)), "max": int(widths.max())},
        "height": {"min": int(heights.min()), "median": int(np.median(heights)), "max": int(heights.max())},
        "sizes": len({(f.width, f.height) for f in read}),
        "modes": dict(Counter(f.mode for f in read).most_common()),
        "formats": dict(Counter(f.format for f in read).most_common()),
    }

"""How big a cache will be, and how big it may be.

The estimate, made before anything is built: the values per image (one forward of one image)
x the images x the views x the bytes they are stored in (`features.cache.storage_dtype`).
The limit, `features.max_gb`, is by default a quarter of the free memory or of the free disk
under the cache directory, whichever is smaller: the cache is written there, and each epoch
reads all of it, at memory speed while the page cache holds it (it is memory-mapped, so a larger
one still works when `max_gb` allows it, at the disk's speed).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from transferkit.features.cache import storage_dtype

GB = 1e9


def cache_bytes(values_per_image: int, images: dict[str, int], views: int, dtype: torch.dtype) -> int:
    """The bytes a cache of `images` per split takes, with `views` training views, computed in
    `dtype` (features, or a prefix's activations: stored alike)."""
    return sum(
        values_per_image * count * storage_dtype(dtype).itemsize * (views if split == "train" else 1)
        for split, count in images.items()
    )


def free_memory() -> int | None:
    """The memory available to new work (MemAvailable: free plus reclaimable caches)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(directory: Path) -> int:
    """Free bytes on the disk that holds `directory` (or its nearest existing parent)."""
    existing = Path(directory).resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def default_limit(directory: Path) -> tuple[float, str]:
    """A quarter of the free memory or disk, whichever is smaller; (bytes, what it is)."""
    disk, memory = free_disk(directory), free_memory()
    if memory is not None and memory <= disk:
        return memory / 4, "a quarter of the free memory"
    return disk / 4, f"a quarter of the free disk under {directory}"


def readable(size: float) -> str:
    if size >= 0.1 * GB:
        return f"{size / GB:.1f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"

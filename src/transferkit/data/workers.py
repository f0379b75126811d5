"""How many loader workers decode images by default: a module of its own, so predict and serve
read it without importing the datamodule (and Lightning with it)."""

from __future__ import annotations

import os


def default_num_workers() -> int:
    """The cores this process may use, at most 8 (more rarely helps decoding)."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

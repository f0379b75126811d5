"""A fresh seed for `seed=null`, and the random number generators' states as plain tensors and
ints, so a checkpoint holding them still loads with `torch.load(weights_only=True)` (numpy's own
state is an array)."""

from __future__ import annotations

import os
import random
import secrets
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def draw_seed() -> int:
    """A fresh seed for `seed=null`, shared with processes this one launches (Lightning's DDP
    re-runs the script per rank and hands them its environment; `seed_everything` reads it)."""
    inherited = os.environ.get("PL_GLOBAL_SEED")
    seed = int(inherited) if inherited else secrets.randbelow(2**31)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    return seed

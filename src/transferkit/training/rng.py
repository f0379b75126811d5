"""A fresh seed for `seed=null`, and the random number generators' states in every checkpoint,
as plain tensors and ints, so a checkpoint holding them still loads with
`torch.load(weights_only=True)` (numpy's own state is an array)."""

from __future__ import annotations

import os
import random
import secrets
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn


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


class RandomState(L.Callback):
    """The generators' states in each checkpoint, set again when a fit resumes from it, so the
    resumed run draws what the uninterrupted one would have (not when a checkpoint is only
    validated or tested)."""

    def __init__(self) -> None:
        self._fitting = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = stage == TrainerFn.FITTING

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting:
            set_rng_states(state_dict)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written before this callback existed keeps the states at its top level."""
        if self.state_key not in checkpoint.get("callbacks", {}) and "rng_states" in checkpoint:
            self.load_state_dict(checkpoint["rng_states"])

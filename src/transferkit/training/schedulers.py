"""Learning-rate schedules that respect per-group learning rates.

Every parameter group keeps its own lr (the head's, or the backbone's head lr x ratio), so these
scale each group's lr rather than setting one value for all.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR

from transferkit.errors import ConfigError


class WarmupCosineLR(LRScheduler):
    """Linear warmup from `warmup_start_factor` x lr over `warmup_epochs`, then cosine decay to
    `min_lr_ratio` x lr at `max_epochs`. Stepped once per epoch."""

    def __init__(
        self,
        optimizer: Optimizer,
        max_epochs: int,
        warmup_epochs: int = 0,
        warmup_start_factor: float = 0.1,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if max_epochs is None or max_epochs < 1:
            raise ConfigError(f"scheduler.max_epochs={max_epochs} must be a positive number of epochs.")
        if not 0 <= warmup_epochs < max_epochs:
            raise ConfigError(
                f"scheduler.warmup_epochs={warmup_epochs} must lie in [0, max_epochs={max_epochs})."
            )
        self.max_epochs, self.warmup_epochs = int(max_epochs), int(warmup_epochs)
        self.warmup_start_factor, self.min_lr_ratio = float(warmup_start_factor), float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_start_factor + (1 - self.warmup_start_factor) * epoch / self.warmup_epochs
        progress = min(1.0, (epoch - self.warmup_epochs) / max(1, self.max_epochs - self.warmup_epochs))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> OneCycleLR:
    """torch's OneCycleLR peaking at each group's own lr (the optimizer's lr for the head, the
    scaled lr for backbone groups). `total_steps` is filled in from the trainer: it steps per batch."""
    return OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=int(total_steps),
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )


LR_KEYS = ("initial_lr", "max_lr", "min_lr")


def follow_schedule(scheduler: LRScheduler, head: dict, group: dict) -> None:
    """Make a param group added mid-training follow the head's schedule at `group["lr_scale"]`
    times its lr: schedulers size their per-group state when they are built."""
    scale = group["lr_scale"] / head.get("lr_scale", 1.0)
    for key, value in head.items():
        if key in LR_KEYS:
            group[key] = value * scale
        elif key not in group:
            group[key] = value  # momentum-cycling keys and the like
    if hasattr(scheduler, "base_lrs"):  # ReduceLROnPlateau has none: it scales the current lr
        scheduler.base_lrs.append(scheduler.base_lrs[0] * scale)
    if getattr(scheduler, "default_min_lr", 0) is None:  # ReduceLROnPlateau with a min_lr per group
        scheduler.min_lrs.append(scheduler.min_lrs[0] * scale)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr.append(group["lr"])

"""The optimizer and its learning-rate scheduler, built from their Hydra configs (`_partial_: true`).

The optimizer takes named param groups: each parameter goes to the group the fine-tuning
strategy's lr plan names (`transferkit.training.finetune`) and trains at the optimizer's lr x that group's
`lr_scale`. The head's group comes first: groups added later follow its schedule.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from transferkit.errors import ConfigError

SCHEDULER_KEYS = ("monitor", "interval", "frequency")  # Lightning's, beside the constructor's
LrPlan = Mapping[str, tuple[str, float]]  # parameter name -> (param group name, lr scale)


def bad_setting(error: Exception) -> ConfigError:
    return ConfigError(f"Bad optimizer or scheduler setting: {error} (check optimizer.* and scheduler.*).")


def weight_decay(optimizer: Mapping[str, Any] | None) -> float:
    """The weight decay the optimizer config asks for (0 when it sets none)."""
    return float((optimizer or {}).get("weight_decay", 0.0) or 0.0)


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    plan: LrPlan,
    decay: float = 0.0,
    head_lr: float | None = None,
) -> list[dict[str, Any]]:
    """The parameters in named groups, head first: one per group the plan names (a parameter it
    does not name goes to "head" or "backbone" at scale 1), each split in two when weight decay is
    on, as decay is not applied to norms and biases (1-D tensors). `head_lr` sets each group's
    lr to head_lr x its `lr_scale`."""
    groups: dict[str, dict[str, Any]] = {}
    for name, param in sorted(named, key=lambda item: not item[0].startswith("head.")):
        group, scale = plan.get(name, ("head" if name.startswith("head.") else "backbone", 1.0))
        no_decay = decay > 0 and param.ndim <= 1
        key = group + ".no_decay" if no_decay else group
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr_scale": scale}
            groups[key].update({"weight_decay": 0.0} if no_decay else {})
            groups[key].update({"lr": head_lr * scale} if head_lr is not None else {})
        groups[key]["params"].append(param)
    return list(groups.values())


def check_settings(
    optimizer: Mapping[str, Any] | None, scheduler: Mapping[str, Any] | None, metric_names: list[str]
) -> None:
    """Build the optimizer and scheduler once on a stand-in parameter, so a value they refuse
    (lr=-1, momentum=2) is reported now, before any data is read."""
    if optimizer is None:
        return
    lr = optimizer.get("lr")
    if lr is not None and not float(lr) > 0:
        raise ConfigError(f"optimizer.lr={lr} must be positive (1e-3 is a usual start).")
    try:
        built = instantiate(optimizer)(params=[nn.Parameter(torch.zeros(1))])
        build_scheduler(scheduler, built, lambda: 10, metric_names)
    except (ValueError, TypeError) as error:  # torch checks values: "Invalid learning rate: -1"
        raise bad_setting(error) from None


def configure_optimizers(
    optimizer: Mapping[str, Any] | None,
    scheduler: Mapping[str, Any] | None,
    groups: list[dict[str, Any]],
    total_steps: Callable[[], int],
    metric_names: list[str],
) -> dict[str, Any]:
    """What `LightningModule.configure_optimizers` returns: the optimizer over `groups` (see
    `param_groups`), each at its lr scale, and the scheduler's dict when one is configured."""
    if optimizer is None:
        raise ConfigError("No optimizer configured; choose one with optimizer=sgd or optimizer=adamw.")
    if not groups:
        raise ConfigError("Nothing to train: every parameter is frozen.")
    try:
        built = instantiate(optimizer)(params=groups)
        for group in built.param_groups:
            group["lr"] *= group["lr_scale"]
        lr_scheduler = build_scheduler(scheduler, built, total_steps, metric_names)
    except (ValueError, TypeError) as error:
        raise bad_setting(error) from None
    if lr_scheduler is None:
        return {"optimizer": built}
    return {"optimizer": built, "lr_scheduler": lr_scheduler}


def build_scheduler(
    config: Mapping[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    total_steps: Callable[[], int],
    metric_names: list[str],
) -> dict[str, Any] | None:
    """Lightning's scheduler dict: the config's `monitor`, `interval` and `frequency` go to
    Lightning, the rest to the constructor. A scheduler that takes `total_steps` (one-cycle) is
    given the run's (asked for only then: counting them may load data) and steps per batch;
    others per epoch. `metric_names`: what `monitor` may name."""
    if not config:
        return None
    arguments = dict(config)
    keys = {k: arguments.pop(k) for k in SCHEDULER_KEYS if k in arguments}
    build = instantiate(arguments)
    if "total_steps" in inspect.signature(build.func).parameters:
        scheduler, interval = build(optimizer=optimizer, total_steps=total_steps()), "step"
    else:
        scheduler, interval = build(optimizer=optimizer), "epoch"
    keys.setdefault("interval", interval)
    _check_scheduler_keys(scheduler, keys, metric_names)
    return {"scheduler": scheduler, **keys}


def _check_scheduler_keys(scheduler: Any, keys: dict[str, Any], metric_names: list[str]) -> None:
    monitor = keys.get("monitor")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and monitor is None:
        raise ConfigError(
            "scheduler.monitor must name the metric ReduceLROnPlateau watches, e.g. "
            "+scheduler.monitor=val/loss (with mode: min) or val/acc (mode: max)."
        )
    if monitor is not None and monitor not in metric_names:
        raise ConfigError(
            f"scheduler.monitor={monitor} is not logged; use one of: {', '.join(metric_names)}."
        )
    if keys["interval"] not in ("epoch", "step"):
        raise ConfigError(f"scheduler.interval={keys['interval']} must be epoch or step.")
    frequency = keys.get("frequency", 1)
    if not isinstance(frequency, int) or frequency < 1:
        raise ConfigError(f"scheduler.frequency={frequency} must be a positive whole number.")

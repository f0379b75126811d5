"""The types of each task's own keys (conf/<task>.yaml), which no `_target_` states: what a value
given on the command line is checked against before any work (`transferkit.config.types`).
The yaml files hold the defaults and say what each key means; tests keep the two in step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from transferkit.config.types import check_types
from transferkit.model.heads import build_head


@dataclass
class Checkpoint:
    self_contained: bool


@dataclass
class Train:
    task_name: str
    seed: int | None
    train: bool
    test: bool
    ckpt_path: str | None
    tune_lr: bool
    print_config: bool
    monitor: str
    optimized_metric: str | None
    checkpoint: Checkpoint


@dataclass
class EvalData:
    root: str | None  # null: the checkpoint's own data


@dataclass
class Eval:
    task_name: str
    ckpt_path: str
    seed: int | None
    split: str | None
    data: EvalData | None  # data=<option> is checked against its _target_
    batch_size: int
    num_workers: int | None
    device: str
    precision: str | None
    runtime: str
    runtime_dir: str
    misclassified: int


@dataclass
class Predict:
    task_name: str
    ckpt_path: str
    input: str
    output: str
    top_k: int
    tta: bool
    batch_size: int
    num_workers: int | None
    device: str
    precision: str | None
    runtime: str
    runtime_dir: str


@dataclass
class Parity:
    images: str | None
    count: int
    atol: float


@dataclass
class Export:
    task_name: str
    ckpt_path: str
    format: str
    output: str
    parity: Parity


@dataclass
class Serve:
    task_name: str
    ckpt_path: str
    host: str
    port: int
    workers: int
    max_batch_size: int
    batch_timeout: float
    max_bytes: int
    max_parts: int
    max_pixels: int
    max_concurrent_decodes: int | None
    max_in_flight: int | None
    body_timeout_s: float
    top_k: int
    graceful_s: float
    device: str
    precision: str | None
    runtime: str
    runtime_dir: str


@dataclass
class AuditOptions:
    near_threshold: float
    pixel_threshold: float
    max_feature_share: float
    neighbours: int
    folds: int
    probe_c: float
    outlier_z: float
    show: int


@dataclass
class Audit:
    task_name: str
    seed: int
    device: str
    audit: AuditOptions


SETTINGS: dict[str, type] = {
    "train": Train,
    "eval": Eval,
    "predict": Predict,
    "export": Export,
    "serve": Serve,
    "audit": Audit,
}


def passed_on(cfg: DictConfig) -> dict[str, Callable[..., Any]]:
    """Nodes whose builder hands their keys on, as a dict or **kwargs, to a callable of their
    own: the model's head options to build_head, the lr finder's to Lightning's Tuner.lr_find
    (imported only for a config that has one: predict and serve start without Lightning)."""
    nodes: dict[str, Callable[..., Any]] = {"model.head": build_head}
    if "lr_finder" in cfg:
        from lightning.pytorch.tuner import Tuner

        nodes["lr_finder"] = Tuner.lr_find
    return nodes


def check_config(cfg: DictConfig) -> None:
    """Refuse a value of the wrong type before the task does any work, in one line: the task's
    own keys against `SETTINGS`, every `_target_` node against what it builds."""
    task = cfg.get("task_name")
    check_types(cfg, SETTINGS.get(task), f"{task}.py", passed_on(cfg))

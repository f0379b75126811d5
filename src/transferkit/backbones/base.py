"""What every backbone family and the dispatcher share: the Backbone every name becomes, the
timm prefix, and the one message for a name no family knows."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

import torchvision
from torch import nn
from torchvision.models import list_models

from transferkit.backbones.preprocessing import Preprocessing
from transferkit.errors import ConfigError

TIMM_PREFIX = "timm:"


@dataclass
class Backbone:
    model: nn.Module
    num_features: int
    preprocessing: Preprocessing


def torchvision_names() -> list[str]:
    return list_models(module=torchvision.models)


@cache
def _known_names() -> tuple[str, ...]:
    import timm

    return tuple(torchvision_names()) + tuple(TIMM_PREFIX + n for n in timm.list_models())


def unknown_model(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, _known_names(), n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(
        f"Unknown model.name={name!r}.{hint} Use a torchvision classification model "
        f"(torchvision.models.list_models()) or any timm model as model.name=timm:<name>."
    )

"""From a model name to a Backbone: torchvision or timm (`timm:<name>`), with its weights, feature
width and preprocessing; an unknown name is refused with the closest known ones."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from transferkit.backbones.preprocessing import Preprocessing
from transferkit.errors import ConfigError, first_line

TIMM_PREFIX = "timm:"


@dataclass
class Backbone:
    model: nn.Module
    num_features: int
    preprocessing: Preprocessing


@cache
def _known_names() -> tuple[str, ...]:
    import timm

    from transferkit.backbones.torchvision_models import torchvision_names

    return tuple(torchvision_names()) + tuple(TIMM_PREFIX + n for n in timm.list_models())


def unknown_model(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, _known_names(), n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(
        f"Unknown model.name={name!r}.{hint} Use a torchvision classification model "
        f"(torchvision.models.list_models()) or any timm model as model.name=timm:<name>."
    )


def build_backbone(name: str, weights: str | bool | None = None) -> Backbone:
    """`weights`: DEFAULT or a named torchvision weight, true (pretrained), null (random init),
    "shipped" (weights a pip package ships) or a path to a local state-dict file."""
    if name.startswith(TIMM_PREFIX):
        from transferkit.backbones.timm_models import build_timm_backbone

        return build_timm_backbone(name[len(TIMM_PREFIX) :], weights)
    from transferkit.backbones.torchvision_models import build_torchvision_backbone

    return build_torchvision_backbone(name, weights)


def check_input_size(model: nn.Module, size: int, name: str) -> None:
    """Refuse an image size the backbone cannot take (a ViT's fixed size, a CNN's minimum)."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ConfigError(
            f"data.image_size={size} does not fit model.name={name} ({first_line(error)}); "
            "use data.image_size=null for the size its weights expect."
        ) from None
    finally:
        model.train(training)

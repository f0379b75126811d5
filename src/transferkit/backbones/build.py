"""From a model name to a Backbone: torchvision or timm (`timm:<name>`), with its weights, feature
width and preprocessing; an unknown name is refused with the closest known ones (`base`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from transferkit.backbones.base import Backbone
from transferkit.backbones.families import build_family
from transferkit.backbones.reference import complete_by_reference
from transferkit.errors import ConfigError, first_line


def build_backbone(name: str, weights: str | bool | None = None) -> Backbone:
    """`weights`: DEFAULT or a named torchvision weight, true (pretrained), null (random init),
    "shipped" (weights a pip package ships) or a path to a local state-dict file (a training
    checkpoint that keeps its backbone by reference included)."""
    return build_family(name, weights, complete_by_reference)


def output_shape(model: nn.Module, size: int) -> torch.Size:
    """The model's output shape for one image of `size` px, worked out on the meta device (no
    arithmetic: a frozen run's backbone never runs in PyTorch on a CPU, and a first eager call
    costs about a second of kernel set-up there). A model the meta device cannot run (an op it
    lacks, a value read back) runs on one real image instead, whose error is the one raised."""
    try:
        with torch.no_grad():
            weights = {name: t.to("meta") for name, t in model.state_dict(keep_vars=True).items()}
            return functional_call(model, weights, (torch.zeros(1, 3, size, size, device="meta"),)).shape
    except Exception:  # noqa: BLE001 - any failure there is judged by the real forward
        with torch.no_grad():
            return model(torch.zeros(1, 3, size, size)).shape


def check_input_size(model: nn.Module, size: int, name: str) -> None:
    """Refuse an image size the backbone cannot take (a ViT's fixed size, a CNN's minimum)."""
    training = model.training
    try:
        output_shape(model.eval(), size)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ConfigError(
            f"data.image_size={size} does not fit model.name={name} ({first_line(error)}); "
            "use data.image_size=null for the size its weights expect."
        ) from None
    finally:
        model.train(training)

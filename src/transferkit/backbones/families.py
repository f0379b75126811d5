"""Which family builds a model name: timm (`timm:<name>`) or torchvision. `complete` fills in a
weights file's tensors that it keeps by reference (`build.build_backbone` passes it; named
weights, which `named` rebuilds through here, are never files)."""

from __future__ import annotations

from transferkit.backbones.base import TIMM_PREFIX, Backbone
from transferkit.backbones.weights import Complete


def build_family(name: str, weights: str | bool | None, complete: Complete | None = None) -> Backbone:
    if name.startswith(TIMM_PREFIX):
        from transferkit.backbones.timm_models import build_timm_backbone

        return build_timm_backbone(name[len(TIMM_PREFIX) :], weights, complete)
    from transferkit.backbones.torchvision_models import build_torchvision_backbone

    return build_torchvision_backbone(name, weights, complete)

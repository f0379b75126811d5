"""torchvision classification models as backbones, through its weights API."""

from __future__ import annotations

from torch import nn
from torchvision.models import get_model, get_model_weights

from transferkit.backbones.base import Backbone, torchvision_names, unknown_model
from transferkit.backbones.preprocessing import Preprocessing
from transferkit.backbones.weights import (
    Complete,
    fetch,
    is_path,
    load_backbone_weights,
    normalise,
    read_state_dict,
)
from transferkit.errors import WeightsError


def weights_enum(name: str, value: str):
    enum = get_model_weights(name)
    try:
        return enum.verify(value)
    except (KeyError, ValueError) as error:
        names = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise WeightsError(
            f"model.weights={value!r} is not a weight of {name}; choose one of: {names}, or null."
        ) from error


def _preprocessing(weights) -> Preprocessing:
    """Read size, resize, mean, std and interpolation off the weights' own transforms."""
    t = weights.transforms()
    return Preprocessing(
        image_size=t.crop_size[0],
        resize_size=t.resize_size[0],
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )


def _drop_aux_heads(model: nn.Module) -> tuple[str, ...]:
    """GoogLeNet and Inception train auxiliary classifiers; a backbone needs none."""
    dropped = ()
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        dropped = tuple(
            attr for attr in ("AuxLogits", "aux1", "aux2") if getattr(model, attr, None) is not None
        )
        for attr in dropped:
            setattr(model, attr, None)
    return dropped


def strip_classifier(model: nn.Module) -> tuple[int, str]:
    """Replace the final classifier with Identity; return the feature width it took and its name."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if not isinstance(head, nn.Module):
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features, attr
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            sub, last = linears[-1]
            head.set_submodule(sub, nn.Identity())
            return last.in_features, f"{attr}.{sub}"
        convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
        if convs:  # SqueezeNet: 1x1 conv classifier; keep only the pooling, the model flattens
            setattr(model, attr, nn.AdaptiveAvgPool2d(1))
            return convs[0].in_channels, attr
    raise WeightsError(f"Cannot find the classifier of {type(model).__name__} to replace.")


def build_torchvision_backbone(
    name: str, weights: str | bool | None, complete: Complete | None = None
) -> Backbone:
    if name not in torchvision_names():
        raise unknown_model(name)
    weights = normalise(weights)
    enum = get_model_weights(name)
    local = weights if is_path(weights) else None
    chosen = (
        None if weights is None or local else weights_enum(name, "DEFAULT" if weights is True else weights)
    )
    if chosen is None:
        model = get_model(name, weights=None)
    else:
        model = fetch(f"{name}:{chosen.name}", lambda: get_model(name, weights=chosen))
    aux = _drop_aux_heads(model)
    num_features, classifier = strip_classifier(model)
    if local:
        load_backbone_weights(model, read_state_dict(local, complete), local, dropped=(classifier, *aux))
    reference = chosen or (enum.DEFAULT if hasattr(enum, "DEFAULT") else None)
    preprocessing = _preprocessing(reference) if reference is not None else Preprocessing()
    return Backbone(model, num_features, preprocessing)

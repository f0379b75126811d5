"""A frozen backbone kept in checkpoints by reference: the name of its weights and a digest of
each tensor left out, instead of the tensors (a frozen VGG16's checkpoint is 513 MB otherwise).

Only a tensor bitwise equal to the named weights' own is left out, decided per tensor at every
save: a block that trained, or BatchNorm statistics that moved (`finetune.bn=train`), stay in.
Loading puts the left-out tensors back from the named weights, found on this machine, after
checking every digest: a one-line error names the weights and how to get them when they are
missing, or says they changed behind their name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from transferkit.backbones.named import NamedWeights, named_weights
from transferkit.errors import WeightsError

RECORD_ENTRY = "backbone_reference"  # in the checkpoint's transferkit record
PREFIX = "backbone."  # the backbone's keys in the module's state dict


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and values (in logical order, whatever its memory format)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}\n".encode())
    digest.update(data.numpy().data)
    return digest.hexdigest()


class BackboneReference:
    """The named weights a backbone was built from, and each of their tensors' digest, taken as
    built, before anything trains: what a save compares the backbone against."""

    def __init__(self, weights: NamedWeights, backbone: nn.Module) -> None:
        self.weights = weights
        self.digests = {name: tensor_digest(t) for name, t in backbone.state_dict().items()}

    @classmethod
    def of(cls, name: str, weights: str | bool | None, backbone: nn.Module) -> BackboneReference | None:
        """None when the weights cannot be had again by name (random init, a local file)."""
        named = named_weights(name, weights, backbone)
        return None if named is None else cls(named, backbone)

    def leave_out(self, state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """Drop from `state` (the module's) the backbone tensors equal to the named weights';
        returns the record that brings them back, None if none is equal."""
        dropped = {}
        for name, reference in self.digests.items():
            tensor = state.get(PREFIX + name)
            if tensor is not None and tensor_digest(tensor) == reference:
                dropped[name] = reference
        if not dropped:
            return None
        for name in dropped:
            del state[PREFIX + name]
        return {
            "model": self.weights.model,
            "weights": self.weights.weights,
            "provider": self.weights.provider(),
            "sha256": dropped,
        }


def _first_difference(state: Mapping[str, torch.Tensor], digests: dict[str, str]) -> str | None:
    """The first tensor of `digests` that `state` lacks or holds otherwise; None if all match."""
    for name, digest in digests.items():
        tensor = state.get(name)
        if tensor is None or tensor_digest(tensor) != digest:
            return name
    return None


def put_back(
    record: dict[str, Any] | None, state: dict[str, torch.Tensor], backbone: nn.Module | None
) -> None:
    """Complete a checkpoint's `state` (the module's state dict) with the tensors it keeps by
    reference: `backbone`'s own when they are those (a resume, the best checkpoint after fit),
    else the named weights' from this machine. Refuses, in one line, weights that differ."""
    reference = (record or {}).get(RECORD_ENTRY)
    if not reference:
        return
    digests: dict[str, str] = reference["sha256"]
    source: Mapping[str, torch.Tensor] = backbone.state_dict() if backbone is not None else {}
    if _first_difference(source, digests) is not None:
        weights = NamedWeights(reference["model"], reference["weights"])
        source = weights.state_dict()
        different = _first_difference(source, digests)
        if different is not None:
            raise WeightsError(
                f"The weights {weights.describe()} on this machine ({weights.provider()}) differ from "
                f"those this checkpoint was saved with ({reference.get('provider')}; e.g. {different}): "
                "they changed behind their name. Load it where the run's version is installed, or "
                "retrain with checkpoint.self_contained=true."
            )
    for name in digests:
        state[PREFIX + name] = source[name]


def complete_by_reference(checkpoint: dict[str, Any]) -> None:
    """A training checkpoint read as a weights file, with its backbone's tensors kept by
    reference put back from the named weights on this machine (another dict: left as it is)."""
    if isinstance(checkpoint.get("transferkit"), dict) and isinstance(checkpoint.get("state_dict"), dict):
        put_back(checkpoint["transferkit"], checkpoint["state_dict"], None)

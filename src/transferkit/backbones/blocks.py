"""A backbone's blocks: the units that fine-tuning strategies freeze, unfreeze and give an lr.

A block is a named, ordered group of parameter names (input side first); together the blocks
hold every parameter of the backbone exactly once. ResNet stages, VGG conv groups, EfficientNet,
MobileNet and MNASNet stages, ConvNeXt, Swin, MaxViT and ShuffleNet stages, DenseNet dense blocks
(each with its transition), ViT encoder layers; timm models use timm's own grouping
(`group_matcher(coarse=True)`, the grouping behind its layer-wise lr decay). Parameters a
grouping leaves out join the block registered before them: a head norm or conv_head after the
last stage joins that stage (so `partial` with one block trains the last stage, not a head
fragment), and anything before the first group joins the stem.

A new backbone declares its blocks in one of two ways:

- give the model a timm-style `group_matcher(coarse: bool) -> dict` method, or
- register a function that names each block's module prefixes, in order:

      @register_blocks(MyNet)
      def _mynet(model: MyNet) -> list[tuple[str, list[str]]]:
          return [("stem", ["conv1", "bn1"]), ("stage1", ["stage1"]), ("stage2", ["stage2"])]

Anything else falls back to the model's top-level children in order, a stage container
(`features`, `layers`, `stages`, `blocks`, `transformers`) opened up and whatever follows it
joined to its last element: coarse but always complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

Spec = list[tuple[str, list[str]]]  # (block name, module prefixes that make it up)


@dataclass(frozen=True)
class Block:
    name: str
    params: tuple[str, ...]


_REGISTRY: dict[type, Callable[[nn.Module], Spec]] = {}


def register_blocks(cls: type) -> Callable[[Callable[[nn.Module], Spec]], Callable[[nn.Module], Spec]]:
    """Declare how models of class `cls` (and its subclasses) split into blocks."""

    def register(fn: Callable[[nn.Module], Spec]) -> Callable[[nn.Module], Spec]:
        _REGISTRY[cls] = fn
        return fn

    return register


def _owned(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _join_neighbours(names: list[str], owner: dict[str, int | None]) -> dict[str, int]:
    """Give each unowned parameter the block of the parameter registered before it: a final
    norm or head conv after the last stage joins that stage, and one registered before any
    owned parameter (a token, a weighting of the stages) joins the first block, the stem."""
    first = min((i for i in owner.values() if i is not None), default=0)
    joined: dict[str, int] = {}
    last_seen = first
    for name in names:
        index = owner.get(name)
        last_seen = last_seen if index is None else index
        joined[name] = last_seen
    return joined


def _from_spec(model: nn.Module, spec: Spec) -> list[Block]:
    """Assign each parameter to the block of its longest matching prefix; the rest join the
    block before them (`_join_neighbours`)."""
    names = [n for n, _ in model.named_parameters()]
    owner: dict[str, int | None] = {}
    for name in names:
        matches = [(len(p), i) for i, (_, prefixes) in enumerate(spec) for p in prefixes if _owned(name, p)]
        owner[name] = max(matches)[1] if matches else None
    joined = _join_neighbours(names, owner)
    blocks = [Block(block, tuple(n for n in names if joined[n] == i)) for i, (block, _) in enumerate(spec)]
    return [b for b in blocks if b.params]


STAGE_CONTAINERS = ("features", "layers", "stages", "blocks", "transformers")


def _children_spec(model: nn.Module) -> Spec:
    """The top-level children in order, a stage container (`STAGE_CONTAINERS`, a Sequential or
    ModuleList) opened up into its elements. Children after the last opened container (a final
    norm, a classifier's pre-logits layers) are left out, so they join its last element rather
    than making a head fragment the last block."""
    spec: Spec = []
    opened_end = None
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name in STAGE_CONTAINERS and isinstance(child, nn.Sequential | nn.ModuleList):
            spec += [(f"{name}.{sub}", [f"{name}.{sub}"]) for sub, _ in child.named_children()]
            opened_end = len(spec)
        else:
            spec.append((name, [name]))
    return spec if opened_end is None else spec[:opened_end]


_UNMATCHED = "\x00unmatched"  # a name no matcher claims: timm puts it with what it leaves out


def _timm_matcher(model: nn.Module) -> dict | Callable[[str], Any]:
    """The coarse (stage-level) grouping; a few families (RDNet) only have the fine one, which
    for them already is stage-level."""
    try:
        return model.group_matcher(coarse=True)
    except (AssertionError, NotImplementedError):
        return model.group_matcher(coarse=False)


def _timm_groups(model: nn.Module) -> dict[str, int | None]:
    """timm's group of each parameter, None for those its matcher leaves out.

    timm sends every unmatched parameter (a head norm, a conv_head, a pre-logits layer) to one
    extra group after the last, which would make a head fragment the last block; a probe name
    that nothing matches lands in that group and so tells it apart.
    """
    from timm.models._manipulate import group_with_matcher

    names = [n for n, _ in model.named_parameters()]
    groups = group_with_matcher([(n, None) for n in [*names, _UNMATCHED]], _timm_matcher(model), reverse=True)
    rest = groups[_UNMATCHED]
    return {n: None if groups[n] == rest else groups[n] for n in names}


def _timm_blocks(model: nn.Module) -> list[Block]:
    """timm's stage groups, input side first, with the parameters it leaves out joined to the
    group before them (`_join_neighbours`); a model its matcher does not group at all falls back
    to its children."""
    names = [n for n, _ in model.named_parameters()]
    owner = _timm_groups(model)
    if all(index is None for index in owner.values()):
        return _from_spec(model, _children_spec(model))
    joined = _join_neighbours(names, owner)
    blocks = []
    for i, group in enumerate(sorted(set(joined.values()))):
        name = "stem" if i == 0 else f"stage{i}"
        blocks.append(Block(name, tuple(n for n in names if joined[n] == group)))
    return blocks


def backbone_blocks(model: nn.Module) -> list[Block]:
    """The blocks of `model`, input side first; every parameter is in exactly one."""
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _from_spec(model, _REGISTRY[cls](model))
    if callable(getattr(model, "group_matcher", None)):
        return _timm_blocks(model)
    return _from_spec(model, _children_spec(model))


def _register_torchvision() -> None:
    from torchvision import models

    @register_blocks(models.ResNet)
    def _resnet(model: models.ResNet) -> Spec:
        return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]

    @register_blocks(models.VGG)
    def _vgg(model: models.VGG) -> Spec:
        """Five conv groups (each ends at a max-pool), then the fully connected fc6/fc7."""
        spec: Spec = []
        group: list[str] = []
        for name, layer in model.features.named_children():
            group.append(f"features.{name}")
            if isinstance(layer, nn.MaxPool2d):
                spec.append((f"conv{len(spec) + 1}", group))
                group = []
        return spec + [("fc", ["classifier"])]

    def _with_head(spec: Spec, final: str) -> Spec:
        """The final 1x1 conv (and any pre-logits layer) joins the last stage."""
        *rest, (name, prefixes) = spec
        return [*rest, (name, [*prefixes, final, "classifier"])]

    @register_blocks(models.EfficientNet)
    def _efficientnet(model: models.EfficientNet) -> Spec:
        """features[0] is the stem and each later child a stage (a Sequential of MBConv blocks)."""
        n = len(model.features)
        spec = [("stem", ["features.0"])] + [(f"stage{i}", [f"features.{i}"]) for i in range(1, n - 1)]
        return _with_head(spec, f"features.{n - 1}")

    def _mobilenet(model: nn.Module) -> Spec:
        """torchvision lists MobileNet's inverted-residual blocks one by one; consecutive blocks
        with the same output width form a stage, as in the papers' tables."""
        n = len(model.features)
        spec: Spec = [("stem", ["features.0"])]
        width = None
        for i in range(1, n - 1):
            out = model.features[i].out_channels
            if out != width:
                spec.append((f"stage{len(spec)}", []))
                width = out
            spec[-1][1].append(f"features.{i}")
        return _with_head(spec, f"features.{n - 1}")

    for cls in (models.MobileNetV2, models.MobileNetV3):
        register_blocks(cls)(_mobilenet)

    @register_blocks(models.RegNet)
    def _regnet(model: models.RegNet) -> Spec:
        return [("stem", ["stem"])] + [
            (f"stage{i + 1}", [f"trunk_output.{name}"])
            for i, (name, _) in enumerate(model.trunk_output.named_children())
        ]

    @register_blocks(models.ConvNeXt)
    def _convnext(model: models.ConvNeXt) -> Spec:
        """Stem, then four stages, each with the downsampling layer that opens it."""
        n = len(model.features)
        spec: Spec = [("stem", ["features.0"]), ("stage1", ["features.1"])]
        spec += [(f"stage{i // 2 + 1}", [f"features.{i}", f"features.{i + 1}"]) for i in range(2, n, 2)]
        return spec

    @register_blocks(models.SwinTransformer)
    def _swin(model: models.SwinTransformer) -> Spec:
        return _convnext(model)

    @register_blocks(models.DenseNet)
    def _densenet(model: models.DenseNet) -> Spec:
        """Stem (conv0, norm0), then each dense block with the transition after it; the final
        norm5 joins the last."""
        blocks = [n for n, _ in model.features.named_children() if n.startswith("denseblock")]
        return [("stem", ["features.conv0", "features.norm0"])] + [
            (f"stage{i}", [f"features.{name}", f"features.transition{i}"]) for i, name in enumerate(blocks, 1)
        ]

    @register_blocks(models.MNASNet)
    def _mnasnet(model: models.MNASNet) -> Spec:
        """The layers before the first stack (a Sequential) are the stem, each stack a stage; the
        final 1x1 conv and its BatchNorm join the last."""
        layers = list(model.layers.named_children())
        first = next(i for i, (_, layer) in enumerate(layers) if isinstance(layer, nn.Sequential))
        stacks = [name for name, layer in layers if isinstance(layer, nn.Sequential)]
        spec: Spec = [("stem", [f"layers.{name}" for name, _ in layers[:first]])]
        return spec + [(f"stage{i}", [f"layers.{name}"]) for i, name in enumerate(stacks, 1)]

    @register_blocks(models.ShuffleNetV2)
    def _shufflenet(model: models.ShuffleNetV2) -> Spec:
        """conv1, then stage2 ... stage4 (torchvision's names); the final 1x1 conv5 joins stage4."""
        return [("stem", ["conv1"])] + [(name, [name]) for name in ("stage2", "stage3", "stage4")]

    @register_blocks(models.MaxVit)
    def _maxvit(model: models.MaxVit) -> Spec:
        """Stem, then the four stages; the classifier's norm and pre-logits layer join the last."""
        return [("stem", ["stem"])] + [(f"stage{i + 1}", [f"blocks.{i}"]) for i in range(len(model.blocks))]

    @register_blocks(models.VisionTransformer)
    def _vit(model: models.VisionTransformer) -> Spec:
        """Patch embedding with the class token and position embedding, then each encoder layer
        (the final LayerNorm joins the last)."""
        stem = ("stem", ["conv_proj", "class_token", "encoder.pos_embedding"])
        return [stem] + [
            (name, [f"encoder.layers.{name}"]) for name, _ in model.encoder.layers.named_children()
        ]


_register_torchvision()

__all__ = ["Block", "backbone_blocks", "register_blocks"]

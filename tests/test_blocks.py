"""How backbones split into blocks: the rules every split keeps, checked on every model config
and on timm families whose grouping leaves head layers (a head norm, a conv_head) unmatched.

Models are built on the meta device: the split depends on structure alone, so no weights are
allocated and even large models build in a fraction of a second.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from conftest import CONF
from omegaconf import OmegaConf
from torch import nn
from torchvision import models

from transferkit.backbones import build_backbone
from transferkit.backbones.blocks import Block, backbone_blocks


def assert_blocks_follow_the_rules(model: nn.Module, last_stage: str | None = None) -> list[Block]:
    """Every parameter in exactly one block, at least three blocks, and a last block that holds
    the last stage (`last_stage`: a parameter-name prefix) rather than a head fragment: a
    numbered stage's parameters and a fair share of the network's."""
    blocks = backbone_blocks(model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    flat = [p for b in blocks for p in b.params]
    assert len(flat) == len(set(flat)), "a parameter is in two blocks"
    assert set(flat) == set(sizes), f"parameters in no block: {sorted(set(sizes) - set(flat))[:5]}"
    assert len(blocks) >= 3, [b.name for b in blocks]
    last = blocks[-1]
    if last_stage is not None:
        stage = {n for n in sizes if n.startswith(last_stage)}
        assert stage, f"no parameter starts with {last_stage!r}"
        assert stage <= set(last.params), (
            f"the last block {last.name} lacks {sorted(stage - set(last.params))[:3]}"
        )
    assert any(re.search(r"\d", n) for n in last.params), f"the last block is a head fragment: {last.params}"
    share = sum(sizes[n] for n in last.params) / sum(sizes.values())
    last_size = sum(sizes[n] for n in last.params)
    assert share >= 1 / (3 * len(blocks)), (
        f"the last block has {last_size} of {sum(sizes.values())} parameters"
    )
    return blocks


def meta_timm(name: str) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0)


CONFIG_LAST_STAGES = {
    "resnet18": "layer4.",
    "resnet50": "layer4.",
    "vgg16": "classifier.",
    "efficientnet_b0": "features.7.",
    "mobilenet_v3_large": "features.15.",
    "convnext_tiny": "features.7.",
    "vit_b_16": "encoder.layers.encoder_layer_11.",
    "timm:tf_efficientnet_lite0": "blocks.6.",
    "timm:resnet18": "layer4.",
}


def model_config_names() -> list[str]:
    return [OmegaConf.load(path).name for path in sorted((CONF / "model").glob("*.yaml"))]


@pytest.mark.parametrize("name", model_config_names())
def test_every_model_config_s_last_block_is_its_last_stage(name: str) -> None:
    with torch.device("meta"):
        model = build_backbone(name, None).model
    assert_blocks_follow_the_rules(model, CONFIG_LAST_STAGES[name])


TIMM_LAST_STAGES = {
    "resnet10t": "layer4.",
    "convnext_atto": "stages.3.",  # head.norm is left unmatched by timm's grouping
    "efficientnet_b0": "blocks.6.",
    "tf_efficientnet_lite0": "blocks.6.",
    "test_efficientnet": "blocks.4.",
    "mobilenetv3_small_050": "blocks.5.",  # conv_head is left unmatched
    "vit_tiny_patch16_224": "blocks.11.",
    "test_vit": "blocks.5.",
    "regnetx_002": "s4.",
    "ghostnet_050": "blocks.9.",
    "resnetv2_18": "stages.3.",  # the final norm is left unmatched
    "densenet121": "features.denseblock4.",  # features.norm5 is left unmatched
    "lcnet_050": "blocks.5.",
    "efficientvim_m1": "stages.2.",  # a parameter before the stem is left unmatched
    "rdnet_tiny": "dense_stages.6.",  # no coarse grouping: its fine one is stage-level
}


@pytest.mark.parametrize("name", sorted(TIMM_LAST_STAGES))
def test_timm_last_block_holds_the_last_stage_and_what_follows_it(name: str) -> None:
    model = meta_timm(name)
    blocks = assert_blocks_follow_the_rules(model, TIMM_LAST_STAGES[name])
    order = [n for n, _ in model.named_parameters()]
    tail = order[order.index(blocks[-1].params[0]) :]
    assert set(tail) <= set(blocks[-1].params), "a layer after the last stage is not in the last block"


def test_timm_partial_unfreeze_last_trains_convnext_s_last_stage() -> None:
    """Issue 13: `finetune=partial finetune.unfreeze_last=1` trained only head.norm (640 params)."""
    blocks = backbone_blocks(meta_timm("convnext_atto"))
    assert [b.name for b in blocks] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert "head.norm.weight" in blocks[-1].params and "stages.3.downsample.0.weight" in blocks[-1].params


def test_mobilenetv3_conv_head_joins_the_last_stage() -> None:
    blocks = backbone_blocks(meta_timm("mobilenetv3_small_050"))
    assert blocks[-1].params[0].startswith("blocks.5.")
    assert blocks[-1].params[-2:] == ("conv_head.weight", "conv_head.bias")


class Grouped(nn.Module):
    """A timm-style model whose matcher leaves out a leading token, a middle layer and a tail."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1))
        self.stem = nn.Linear(2, 2)
        self.blocks = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.bridge = nn.Linear(2, 2)
        self.last = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": [(r"^blocks\.(\d+)", None), (r"^last", (99999,))]}


def test_unmatched_parameters_join_the_block_before_them_and_leading_ones_the_stem() -> None:
    blocks = backbone_blocks(Grouped())
    assert [(b.name, b.params) for b in blocks] == [
        ("stem", ("token", "stem.weight", "stem.bias")),
        ("stage1", ("blocks.0.weight", "blocks.0.bias")),
        (
            "stage2",
            (
                "blocks.1.weight",
                "blocks.1.bias",
                "bridge.weight",
                "bridge.bias",
                "last.weight",
                "last.bias",
                "norm.weight",
                "norm.bias",
            ),
        ),
    ]


TORCHVISION_LAST_STAGES = {
    "alexnet": "features.10.",  # no block list: the fallback, with the classifier after the features
    "densenet121": "features.denseblock4.",  # features.norm5 after it
    "googlenet": "inception5b.",
    "inception_v3": "Mixed_7c.",
    "maxvit_t": "blocks.3.",  # the classifier's norm and pre-logits layer after it
    "mnasnet0_5": "layers.13.",  # the final 1x1 conv and its BatchNorm after it
    "mobilenet_v2": "features.17.",
    "regnet_x_400mf": "trunk_output.block4.",
    "resnext50_32x4d": "layer4.",
    "shufflenet_v2_x0_5": "stage4.",  # conv5 after it
    "squeezenet1_1": "features.12.",
    "swin_v2_t": "features.7.",
    "vit_b_32": "encoder.layers.encoder_layer_11.",
}


def torchvision_backbone(name: str) -> nn.Module:
    """On the meta device, except RegNet, whose constructor computes its widths with tensors."""
    device = "cpu" if name.startswith("regnet") else "meta"
    with torch.device(device):
        return build_backbone(name, None).model


@pytest.mark.parametrize("name", sorted(TORCHVISION_LAST_STAGES))
def test_torchvision_last_block_holds_the_last_stage(name: str) -> None:
    model = torchvision_backbone(name)
    blocks = assert_blocks_follow_the_rules(model, TORCHVISION_LAST_STAGES[name])
    order = [n for n, _ in model.named_parameters()]
    assert set(order[order.index(blocks[-1].params[0]) :]) <= set(blocks[-1].params)


def test_densenet_stages_hold_their_transition() -> None:
    blocks = backbone_blocks(torchvision_backbone("densenet121"))
    assert [b.name for b in blocks] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert "features.transition1.conv.weight" in blocks[1].params
    assert blocks[-1].params[-1] == "features.norm5.bias"


TIMM_UNGROUPED_LAST_STAGES = {  # timm models without a group_matcher: the children fallback
    "caformer_s18": "stages.3.",
    "pit_ti_224": "transformers.2.",
    "csatv2": "stages.3.",
}


@pytest.mark.parametrize("name", sorted(TIMM_UNGROUPED_LAST_STAGES))
def test_timm_models_without_a_grouping_split_into_their_stages(name: str) -> None:
    model = meta_timm(name)
    blocks = assert_blocks_follow_the_rules(model, TIMM_UNGROUPED_LAST_STAGES[name])
    assert len(blocks) >= 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted(n for n in models.list_models(module=models) if not n.startswith("regnet"))
)
def test_every_torchvision_classifier_splits_by_the_rules(name: str) -> None:
    assert_blocks_follow_the_rules(torchvision_backbone(name))

"""Backbones by name: every model config, weights from every source, and weights errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import CONF, TINY_MODEL
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_blocks import assert_blocks_follow_the_rules
from torch import nn

from transferkit.backbones import build_backbone
from transferkit.backbones.blocks import backbone_blocks, register_blocks
from transferkit.backbones.preprocessing import Preprocessing
from transferkit.errors import ConfigError, WeightsError
from transferkit.model.module import TransferModule

MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def test_the_issue_s_model_configs_exist() -> None:
    required = {
        "efficientnet_lite0",
        "resnet18",
        "resnet50",
        "vgg16",
        "efficientnet_b0",
        "mobilenet_v3_large",
        "convnext_tiny",
        "vit_b_16",
        "timm",
    }
    assert required <= set(MODEL_CONFIGS)


@pytest.mark.slow  # about a second a model: make test-fast keeps its minute
@pytest.mark.parametrize("option", MODEL_CONFIGS)
def test_every_model_config_builds_and_maps_a_batch_to_class_scores(option: str) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"model={option}", "model.weights=null"])
    with torch.device("meta"):  # shapes without weights: vgg16's 138 M parameters cost nothing
        model = TransferModule(cfg.model.name, ["a", "b", "c"], weights=None)
        size = model.preprocessing.image_size
        model.eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3) and logits.is_meta
    assert model.head[-1].out_features == 3


def test_local_state_dict_file_loads_exactly(tmp_path: Path) -> None:
    source = build_backbone(TINY_MODEL, None).model
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone(TINY_MODEL, str(path)).model
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_torchvision_state_dict_with_its_classifier_loads(tmp_path: Path) -> None:
    import torchvision

    full = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("resnet18", str(path))
    assert torch.equal(backbone.model.conv1.weight, full.conv1.weight)
    assert backbone.num_features == 512


@pytest.mark.slow
def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit"):
        build_backbone("resnet18", str(path))


def test_missing_weights_file() -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone("resnet18", "/no/such/weights.pth")


def test_unknown_weight_name_lists_the_valid_ones() -> None:
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        build_backbone("resnet18", "IMAGENET_V9")


@pytest.mark.parametrize(
    "name, suggestion", [("resnet19", "resnet18"), ("timm:convnext_nanno", "timm:convnext_nano")]
)
def test_unknown_model_suggests_close_names(name: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"Unknown model.name.*{suggestion}"):
        build_backbone(name, None)


def test_torchvision_download_offline_says_how_to_fix() -> None:
    with pytest.raises(WeightsError, match=r"model.weights=null.*model.weights=/path"):
        build_backbone("resnet18", "DEFAULT")


def test_timm_download_offline_says_how_to_fix() -> None:
    with pytest.raises(WeightsError, match=r"model.weights=null.*model.weights=/path"):
        build_backbone("timm:resnet18", True)


def test_preprocessing_follows_the_weights() -> None:
    with torch.device("meta"):
        lite0 = build_backbone("timm:tf_efficientnet_lite0", None).preprocessing
        vit = build_backbone("vit_b_16", None).preprocessing
    assert (lite0.mean, lite0.std, lite0.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    assert (vit.image_size, vit.resize_size, vit.interpolation) == (224, 256, "bilinear")
    assert vit.mean == (0.485, 0.456, 0.406)


def test_shipped_lite0_weights_classify_a_cat_photo_as_a_cat() -> None:
    """scikit-image's chelsea (a tabby) must land in ImageNet's cat classes 281-285."""
    import timm
    from PIL import Image
    from skimage import data

    backbone = build_backbone("timm:tf_efficientnet_lite0", "shipped")
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    from transferkit.backbones.weights import load_positional, shipped_state_dict

    load_positional(classifier, shipped_state_dict("tf_efficientnet_lite0"), "shipped")
    classifier.eval()
    backbone.model.eval()
    image = backbone.preprocessing.transforms(train=False)(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top = classifier(image).softmax(-1).topk(3)
        features = backbone.model(image)
    assert 281 <= int(top.indices[0, 0]) <= 285
    assert float(top.values[0, 0]) > 0.3
    with torch.no_grad():  # the backbone is the same network up to its pooled features
        torch.testing.assert_close(
            features, classifier.forward_head(classifier.forward_features(image), pre_logits=True)
        )


EXPECTED_BLOCKS = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "vgg16": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc"],
    "efficientnet_b0": ["stem"] + [f"stage{i}" for i in range(1, 8)],
    "mobilenet_v3_large": ["stem"] + [f"stage{i}" for i in range(1, 7)],
    "convnext_tiny": ["stem", "stage1", "stage2", "stage3", "stage4"],
    "vit_b_16": ["stem"] + [f"encoder_layer_{i}" for i in range(12)],
    "timm:tf_efficientnet_lite0": ["stem"] + [f"stage{i}" for i in range(1, 8)],
    "timm:resnet18": ["stem", "stage1", "stage2", "stage3", "stage4"],
}


def model_config_names() -> list[str]:
    names = []
    for path in sorted((CONF / "model").glob("*.yaml")):
        names.append(OmegaConf.load(path).name)
    return names


@pytest.mark.parametrize("name", model_config_names())
def test_every_model_config_splits_into_sensible_blocks(name: str) -> None:
    """Every parameter in exactly one block, blocks in forward order, named as documented."""
    with torch.device("meta"):
        model = build_backbone(name, None).model
    blocks = backbone_blocks(model)
    assert [b.name for b in blocks] == EXPECTED_BLOCKS[name]
    flat = [p for b in blocks for p in b.params]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters()) and len(flat) == len(set(flat))
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    assert [order[b.params[0]] for b in blocks] == sorted(order[b.params[0]] for b in blocks)


def test_a_registered_backbone_declares_its_own_blocks() -> None:
    class TwoStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1))
            self.a, self.b, self.norm = nn.Linear(2, 2), nn.Linear(2, 2), nn.LayerNorm(2)

    register_blocks(TwoStage)(lambda m: [("first", ["token", "a"]), ("second", ["b"])])
    blocks = backbone_blocks(TwoStage())
    assert [(b.name, b.params) for b in blocks] == [
        ("first", ("token", "a.weight", "a.bias")),
        ("second", ("b.weight", "b.bias", "norm.weight", "norm.bias")),  # the trailing norm joins
    ]


def test_an_unknown_backbone_falls_back_to_its_children() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert [b.name for b in backbone_blocks(model)] == ["0", "2"]


def forward_width(model: nn.Module, size: int) -> int:
    with torch.no_grad():
        return model.eval()(torch.zeros(1, 3, size, size)).shape[-1]


def assert_width_and_blocks(name: str, size: int) -> None:
    """The head is sized from `num_features`: it must be the width the backbone returns."""
    backbone = build_backbone(f"timm:{name}", None)
    assert backbone.num_features == forward_width(backbone.model, size)
    assert_blocks_follow_the_rules(backbone.model)


TIMM_SAMPLE = {  # name: a small input size it takes
    "mobilenetv3_small_050": 64,  # pooled features 1024 wide, num_features 288
    "ghostnet_050": 64,  # 1280 wide, num_features 480
    "convnext_atto": 64,
    "resnet10t": 64,
    "efficientnet_b0": 64,
    "test_vit": 64,
    "regnetx_002": 64,
}


@pytest.mark.parametrize("name", sorted(TIMM_SAMPLE))
def test_timm_num_features_is_the_width_of_what_the_backbone_returns(name: str) -> None:
    assert_width_and_blocks(name, TIMM_SAMPLE[name])


TIMM_SWEEP = {  # one or two small models per timm module; name: a small input size it takes
    **dict.fromkeys(["cs3darknet_focus_s", "densenet121", "dla34", "dpn48b", "edgenext_xx_small"], 64),
    **dict.fromkeys(["efficientvit_b0", "efficientvit_m0", "fasternet_t0", "fastvit_t8", "gernet_s"], 64),
    **dict.fromkeys(["ghostnetv2_100", "hardcorenas_a", "hgnet_tiny", "hgnetv2_b0", "lcnet_050"], 64),
    **dict.fromkeys(["inception_next_atto", "lcnetv2_small", "mambaout_femto", "mixnet_s"], 64),
    **dict.fromkeys(["mobilenetv4_conv_small", "mobileone_s0", "mobilevit_xxs", "pvt_v2_b0"], 64),
    **dict.fromkeys(["repghostnet_050", "repvit_m0_9", "resnest14d", "resnetv2_18", "rexnet_100"], 64),
    **dict.fromkeys(["semnasnet_050", "starnet_s1", "test_nfnet", "tiny_vit_5m_224", "tinynet_e"], 64),
    **dict.fromkeys(["ese_vovnet19b_slim", "xcit_nano_12_p16_224", "cpubone_nano", "lowformer_b0"], 64),
    **dict.fromkeys(["efficientvim_m1", "shvit_s1", "swiftformer_xs", "nf_regnet_b0", "caformer_s18"], 64),
    **dict.fromkeys(["rdnet_tiny", "hrnet_w18_small", "test_byobnet", "crossvit_tiny_240"], 64),
    **dict.fromkeys(["deit_tiny_patch16_224", "eva02_tiny_patch14_224", "levit_128s", "pit_ti_224"], 224),
    **dict.fromkeys(["coat_lite_tiny", "convit_tiny", "efficientformerv2_s0", "vit_tiny_patch16_224"], 224),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM_SWEEP))
def test_timm_sweep_num_features_and_blocks(name: str) -> None:
    assert_width_and_blocks(name, TIMM_SWEEP[name])


@pytest.mark.parametrize("name", model_config_names())
def test_every_model_config_s_num_features_is_its_output_width(name: str) -> None:
    """On the meta device: shapes without weights, so even vgg16 costs nothing."""
    with torch.device("meta"):
        backbone = build_backbone(name, None)
        assert backbone.num_features == forward_width(backbone.model, backbone.preprocessing.image_size)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    sorted(
        n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith("regnet")
    ),
)
def test_every_torchvision_classifier_s_num_features_is_its_output_width(name: str) -> None:
    with torch.device("meta"):
        backbone = build_backbone(name, None)
        assert backbone.num_features == forward_width(backbone.model, 299 if name == "inception_v3" else 224)


def test_a_timm_mobilenetv3_module_maps_a_batch_to_class_scores() -> None:
    """Issue 21: the head was sized 288 wide for 1024-wide features (mat1 and mat2 shapes)."""
    module = TransferModule(name="timm:mobilenetv3_small_050", class_names=["a", "b", "c"], weights=None)
    with torch.no_grad():
        logits = module.eval()(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 3)


def photos() -> list:
    """A landscape and a portrait photo: crop modes differ only on non-square images."""
    from PIL import Image
    from skimage import data

    cat = Image.fromarray(data.chelsea())  # 451 x 300
    return [cat, cat.transpose(Image.Transpose.ROTATE_90)]


def assert_same_pixels(ours: torch.Tensor, theirs: torch.Tensor, std: tuple[float, ...]) -> None:
    """Equal to 1/255 of a pixel value, whatever the normalisation."""
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1 / 255 / min(std))


CROP_MODE_MODELS = {  # timm models whose pretrained config names each crop mode
    "center": "convnext_atto",
    "squash": "dm_nfnet_f0.dm_in1k",  # 192 px, crop_pct 0.9
    "border": "deepseek_vit_412m.deepseek_v4_flash_vision_exp",  # 392 px, crop_pct 1.0
}


@pytest.mark.parametrize("mode", sorted(CROP_MODE_MODELS))
def test_timm_eval_transform_is_timm_s_own_for_each_crop_mode(mode: str) -> None:
    """Issue 13: a squash model was given a short-side resize and a centre crop."""
    from timm.data import create_transform, resolve_data_config

    with torch.device("meta"):  # only the config matters; the transforms run outside
        backbone = build_backbone(f"timm:{CROP_MODE_MODELS[mode]}", None)
    config = resolve_data_config({}, model=backbone.model)
    assert config["crop_mode"] == mode
    assert backbone.preprocessing.crop_mode == mode
    ours, theirs = backbone.preprocessing.transforms(train=False), create_transform(**config)
    for photo in photos():
        assert_same_pixels(ours(photo), theirs(photo), backbone.preprocessing.std)


@pytest.mark.parametrize("mode", ["squash", "border"])
def test_crop_modes_with_a_crop_match_timm(mode: str) -> None:
    """crop_pct < 1: border mode crops the long side and pads the short one with the mean."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    pre = Preprocessing(64, 71, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", crop_mode=mode)
    theirs = transforms_imagenet_eval(64, 0.9, mode, interpolation="bicubic", mean=pre.mean, std=pre.std)
    for photo in photos():
        assert_same_pixels(pre.transforms(train=False)(photo), theirs(photo), pre.std)


def test_an_unknown_crop_mode_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"crop_mode='diagonal'.*center, squash, border") as error:
        Preprocessing().with_overrides(crop_mode="diagonal")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="crop_mode"):
        Preprocessing(crop_mode="letterbox")


def test_preprocessing_saved_without_a_crop_mode_still_loads() -> None:
    """Checkpoints and model.json files written before crop_mode existed."""
    old = {k: v for k, v in Preprocessing(160, 182).to_dict().items() if k != "crop_mode"}
    assert Preprocessing(**old).crop_mode == "center"
    assert Preprocessing(crop_mode="squash").with_overrides(**old).crop_mode == "squash"


def test_crop_mode_survives_to_dict_and_overrides() -> None:
    pre = Preprocessing(crop_mode="border")
    assert (
        Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in pre.to_dict().items()}) == pre
    )
    assert pre.with_overrides(**pre.to_dict()) == pre
    assert pre.with_overrides(image_size=128).crop_mode == "border"
    assert pre.with_overrides(crop_mode="center").crop_mode == "center"

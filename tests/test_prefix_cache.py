"""The prefix cache: when only top blocks train, the frozen blocks below them cost one forward
pass. The split gives the whole model's outputs, its key changes with what changes the
activations, a run on it matches an uncached run, and what cannot use it says why."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_MODEL
from helpers import val_accuracy
from torch import nn

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.errors import ConfigError
from transferkit.features import FrozenFeatures, store
from transferkit.features.cache import FORMAT_VERSION, _files, cache_key, weights_fingerprint
from transferkit.features.frozen import NoCache, frozen_blocks
from transferkit.features.prefix import NoPrefixSplit, eval_mode, split_backbone
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.train import train
from transferkit.training.finetune import Freeze, Full, Gradual, Partial

STRATEGIES = {
    "partial-1": lambda: Partial(unfreeze_last=1),
    "partial-2": lambda: Partial(unfreeze_last=2),
    "gradual-milestones": lambda: Gradual(milestones=[1, 2]),
    "gradual-at-epoch": lambda: Gradual(unfreeze_at_epoch=1, unfreeze_last=None),
    "full": lambda: Full(),
}
FAMILIES = {  # model name: image size
    "resnet18": 32,  # torchvision ResNet
    "mobilenet_v3_small": 32,  # torchvision MobileNet (stochastic-depth-free inverted residuals)
    "timm:resnet10t": 32,
    TINY_MODEL: 32,  # timm EfficientNet
    "timm:test_vit": 160,  # timm ViT: class token and position embedding in the stem
}


def frozen_model(name: str, strategy: str) -> tuple[TransferModule, Partial | Gradual | Full]:
    model = TransferModule(name, ["a", "b", "c"], weights=None)
    finetune = STRATEGIES[strategy]()
    finetune.freeze_before_training(model)
    return model, finetune


# make test-fast checks a sample (each strategy once, three families); the rest of the matrix is slow.
FAST_CASES = {
    ("partial-1", "resnet18"),
    ("partial-1", "timm:resnet10t"),
    ("partial-1", TINY_MODEL),
    ("partial-2", TINY_MODEL),
    ("gradual-milestones", "resnet18"),
    ("gradual-at-epoch", TINY_MODEL),
    ("full", TINY_MODEL),
}
MATRIX = [
    pytest.param(strategy, name, marks=() if (strategy, name) in FAST_CASES else pytest.mark.slow)
    for strategy in STRATEGIES
    for name in FAMILIES
]


@pytest.mark.slow  # up to a second a case: make test-fast keeps its minute
@pytest.mark.parametrize(("strategy", "name"), MATRIX)
def test_prefix_and_top_give_the_whole_model_s_logits(name: str, strategy: str) -> None:
    """In eval mode, as validation runs; strategies that train every block have no prefix."""
    torch.manual_seed(0)
    model, finetune = frozen_model(name, strategy)
    index = frozen_blocks(finetune)
    if strategy in ("gradual-at-epoch", "full"):
        assert index == 0
        return
    expected = {"partial-1": len(finetune.blocks) - 1, "partial-2": len(finetune.blocks) - 2}
    assert index == expected.get(strategy, len(finetune.blocks) - 2)  # milestones [1, 2]: two blocks
    split = split_backbone(model.backbone, finetune.blocks, index, FAMILIES[name])
    images = torch.randn(3, 3, FAMILIES[name], FAMILIES[name])
    with torch.no_grad(), eval_mode(model):
        activations = split.prefix()(images)
        assert tuple(activations.shape) == (3, *split.activation_shape)
        logits = model.head(split(activations))
        torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-5 * float(logits.abs().max()))


@pytest.mark.parametrize(
    ("name", "bn"),
    [
        pytest.param("resnet18", "frozen", marks=pytest.mark.slow),
        (TINY_MODEL, "frozen"),
        (TINY_MODEL, "fixed_stats"),
    ],
)
def test_the_top_trains_as_the_model_does(name: str, bn: str) -> None:
    """In training mode (frozen blocks held in eval, the trained ones' BatchNorm on batch
    statistics, or on the pretrained ones with bn=fixed_stats), the top on eval-mode prefix
    activations gives the model's features, and its gradients reach the model's own parameters."""
    torch.manual_seed(0)
    model = TransferModule(name, ["a", "b", "c"], weights=None)
    finetune = Partial(unfreeze_last=2, bn=bn)
    finetune.freeze_before_training(model)
    split = split_backbone(model.backbone, finetune.blocks, frozen_blocks(finetune), 32)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), eval_mode(model):
        activations = split.prefix()(images)
    model.train()
    features = split(activations)
    torch.testing.assert_close(features, model.backbone(images), rtol=1e-5, atol=1e-5)
    features.sum().backward()
    trained = [p for p in model.backbone.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)
    assert not any("prefix" in key.lower() or "top" in key.lower() for key in model.state_dict())


class Crossing(nn.Module):
    """Two tensors of the lower blocks reach the top (DenseNet-style concatenation)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.middle = nn.Conv2d(4, 4, 3, padding=1)
        self.top = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.stem(x)
        return torch.cat([self.top(self.middle(low)), low], 1).mean((2, 3))


class Branching(Crossing):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.stem(x)
        return self.top(self.middle(low if low.sum() > 0 else -low)).mean((2, 3))


@pytest.mark.parametrize(
    ("backbone", "reason"), [(Crossing, "no single tensor"), (Branching, "cannot trace")]
)
def test_a_backbone_that_cannot_be_split_says_why(backbone: type[nn.Module], reason: str) -> None:
    from transferkit.backbones.blocks import backbone_blocks

    model = backbone()
    with pytest.raises(NoPrefixSplit, match=reason):
        split_backbone(model, backbone_blocks(model), 2, 16)


def test_the_key_follows_everything_that_changes_the_activations(image_folder: Path) -> None:
    torch.manual_seed(0)
    model, finetune = frozen_model(TINY_MODEL, "partial-2")
    index = frozen_blocks(finetune)
    split = split_backbone(model.backbone, finetune.blocks, index, 32)
    lower = split_backbone(model.backbone, finetune.blocks, index - 1, 32)
    files = {"train": sorted((p, 0) for p in (image_folder / "train" / "circle").glob("*.png"))}
    transforms = {"eval": "Resize(32)", "train": None}

    def key(split=split, transforms=transforms, views=1, dtype=torch.float32) -> str:
        return cache_key(split.prefix(), files, transforms, views, dtype, 0, split.boundary)

    base = key()
    assert key() == base
    changed = [
        key(split=lower),
        key(transforms={"eval": "Resize(40)", "train": None}),
        key(views=2),
        key(dtype=torch.bfloat16),
    ]
    with torch.no_grad():
        top_param = next(p for n, p in model.backbone.named_parameters() if n in finetune.blocks[-1].params)
        top_param.add_(1.0)
        assert key() == base  # the trained top's weights do not change the activations
        next(model.backbone.parameters()).add_(1.0)  # the stem's
    changed.append(key())
    assert len({base, *changed}) == 1 + len(changed)


def test_the_whole_backbone_key_is_unchanged_but_for_the_format(image_folder: Path) -> None:
    """The key of a frozen backbone's features is the one it has always been, with format 5
    (fp32 results stored as fp32): a cache of format 4 (fp32 results stored as fp16) or 3 (one
    torch.save file) is never misread."""
    model = TransferModule(TINY_MODEL, ["a", "b"], weights=None)
    files = {"val": sorted((p, 1) for p in (image_folder / "val" / "square").glob("*.png"))}
    transforms = {"eval": "T", "train": None}
    payload = {
        "format": FORMAT_VERSION,
        "weights": weights_fingerprint(model.backbone),
        "transforms": transforms,
        "files": {"val": _files(files["val"])},
        "views": 1,
        "precision": "torch.float32",
        "seed": None,
    }
    before = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert FORMAT_VERSION == 5
    assert cache_key(model.backbone, files, transforms, 1, torch.float32, 7) == before


@pytest.mark.slow
def test_a_partial_run_on_the_prefix_cache_matches_an_uncached_one(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """augment=false, 3 epochs, fp32 throughout (the prefix's activations are stored as
    computed): the losses agree to 1e-5 (the prefix runs in other batch sizes when caching). The
    whole backbone never runs on a training or validation batch of the cached run, and its
    checkpoint is an ordinary full model with the same state-dict keys."""
    overrides = [*tiny_overrides, "finetune=partial", "data.augment=false", "trainer.max_epochs=3"]
    plain = train(compose_train(tmp_path / "a", [*overrides, "features.cache=false"]))
    calls: list[int] = []
    original = TransferModule._run_backbone
    monkeypatch.setattr(
        TransferModule, "_run_backbone", lambda self, x: calls.append(len(x)) or original(self, x)
    )
    cached = train(compose_train(tmp_path / "b", [*overrides, "features.cache=true"]))
    assert cached["feature_cache"] and plain["feature_cache"] is None and calls == []
    assert abs(cached["val/acc"] - plain["val/acc"]) <= 0.01
    assert cached["val/loss"] == pytest.approx(plain["val/loss"], abs=1e-5)
    stored = torch.from_numpy(store.open_array(store.features_file(Path(cached["feature_cache"]), "train")))
    assert stored.dtype == torch.float32 and stored.ndim == 5  # (views, N, C, H, W)
    states = [torch.load(r["best_model_path"], weights_only=True)["state_dict"] for r in (plain, cached)]
    assert list(states[0]) == list(states[1])
    model = load_model(cached["best_model_path"]).eval()
    accuracy, _ = val_accuracy(model, tiny_overrides[1].split("=", 1)[1])
    assert accuracy == pytest.approx(cached["val/acc"], abs=1e-6)


@pytest.mark.slow
def test_a_cache_past_max_gb_is_skipped_with_the_reason_or_refused(
    compose_train, tmp_path: Path, tiny_overrides: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    overrides = [*tiny_overrides, "finetune=partial", "trainer.max_epochs=1", "features.max_gb=1e-9"]
    with caplog.at_level("INFO", logger="transferkit"):
        results = train(compose_train(tmp_path / "a", overrides))
    assert results["feature_cache"] is None
    assert "Feature cache: the activations below block stage5" in caplog.text
    assert "Training without a feature cache: the cache would take about" in caplog.text
    with pytest.raises(ConfigError, match=r"features.cache=true cannot be used: the cache would take about"):
        train(compose_train(tmp_path / "b", [*overrides, "features.cache=true"]))


@pytest.mark.slow
def test_cache_true_with_nothing_frozen_is_refused_in_one_line(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    with pytest.raises(ConfigError) as refused:
        train(compose_train(tmp_path, [*tiny_overrides, "finetune=full", "features.cache=true"]))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("features.cache=true cannot be used: every block of the backbone trains")


def test_what_the_cache_holds_for_each_strategy(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """freeze: the whole backbone's features (None); partial and gradual (by default): a
    prefix; a strategy that trains every block, or BatchNorm everywhere, or a backbone that
    cannot be cut: nothing, and why."""
    data = ImageFolderDataModule(image_folder, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    features = FrozenFeatures()
    held = {}
    for strategy in (Freeze(), Partial(), Gradual(), Full(), Partial(bn="train")):
        model = TransferModule(TINY_MODEL, ["a", "b", "c"], weights=None, preprocessing={"image_size": 32})
        strategy.freeze_before_training(model)
        try:
            held[type(strategy).__name__ + strategy.bn] = features.source(model, data, trainer, strategy)
        except NoCache as reason:
            held[type(strategy).__name__ + strategy.bn] = str(reason)
    assert held["Freezefrozen"] is None
    assert held["Partialfrozen"].block == held["Gradualfrozen"].block == "stage5"
    assert held["Fullfrozen"].startswith("every block of the backbone trains")
    assert held["Partialtrain"].startswith("finetune.bn=train trains BatchNorm")

    def uncuttable(*args, **kwargs):
        raise NoPrefixSplit("no single tensor carries it")

    monkeypatch.setattr("transferkit.features.frozen.split_backbone", uncuttable)
    partial = Partial()
    partial.freeze_before_training(model)
    with pytest.raises(NoCache, match="^the backbone cannot be cut below block stage5: no single tensor"):
        features.source(model, data, trainer, partial)

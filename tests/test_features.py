"""The feature cache and the cheap frozen forward: one backbone pass in total, reused, rebuilt
whenever what it depends on changes, and never trusted when damaged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from helpers import val_accuracy

import transferkit.features.cache as cache_module
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.images import load_rgb
from transferkit.data.sampling import EpochSampler
from transferkit.errors import ConfigError
from transferkit.features import store
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.train import train, use_feature_cache


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images run through the backbone by the cache builder, one entry per extraction pass."""
    counted: list[int] = []
    extract = cache_module.extract

    def counting(backbone, loader, *args, **kwargs):
        ran = extract(backbone, loader, *args, **kwargs)
        counted.append(ran)
        return ran

    monkeypatch.setattr(cache_module, "extract", counting)
    return counted


def cached(path: str | Path, split: str) -> torch.Tensor:
    """A cache's (views, N, ...) features of `split`, as written."""
    return torch.from_numpy(store.open_array(store.features_file(Path(path), split)))


def backbone_calls(model: TransferModule) -> list[int]:
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    return calls


@pytest.mark.slow
def test_frozen_run_caches_once_and_a_second_run_reuses_it(
    compose_train, tmp_path: Path, tiny_overrides: list[str], image_folder: Path, passes: list[int]
) -> None:
    first = train(compose_train(tmp_path / "a", [*tiny_overrides, f"features.dir={tmp_path}/cache"]))
    assert first["feature_cache"] and Path(first["feature_cache"]).is_dir()
    n_images = sum(1 for _ in image_folder.rglob("*.png"))
    assert sum(passes) == n_images  # train + val, one pass
    second = train(compose_train(tmp_path / "b", [*tiny_overrides, f"features.dir={tmp_path}/cache"]))
    assert second["feature_cache"] == first["feature_cache"] and sum(passes) == n_images
    assert second["val/acc"] == first["val/acc"]


@pytest.mark.slow
def test_training_on_the_cache_never_runs_the_backbone(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = TransferModule.features

    def spy(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(TransferModule, "features", spy)
    results = train(compose_train(tmp_path, tiny_overrides))
    assert results["feature_cache"] and calls == []  # fit, validate: all on cached features


@pytest.mark.slow
def test_any_change_in_the_key_rebuilds(
    compose_train, tmp_path: Path, tiny_overrides: list[str], image_folder: Path, passes: list[int]
) -> None:
    overrides = [*tiny_overrides, f"features.dir={tmp_path}/cache", "trainer.max_epochs=1"]
    first = train(compose_train(tmp_path / "a", overrides))["feature_cache"]
    image = next((image_folder / "train" / "circle").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    touched = train(compose_train(tmp_path / "b", overrides))["feature_cache"]
    resized = train(compose_train(tmp_path / "c", [*overrides, "data.image_size=40"]))["feature_cache"]
    head_sweep = [*overrides, "optimizer.lr=0.01", "model.head.dropout=0.3", "trainer.max_epochs=2"]
    reused = train(compose_train(tmp_path / "d", head_sweep))["feature_cache"]
    assert len({first, touched, resized}) == 3  # a touched file, another size: new keys
    assert reused == touched  # head hyper-parameters do not change the features
    assert len(passes) == 3 * 2


def tiny_splits(image_folder: Path, per_class: int = 3) -> dict[str, list[tuple[Path, int]]]:
    return {
        split: [(path, label) for label, name in enumerate(("circle", "square")) for path in
                sorted((image_folder / split / name).glob("*.png"))[:per_class]]
        for split in ("train", "val")
    }  # fmt: skip


def build_tiny(directory: Path, image_folder: Path, **kwargs) -> tuple[dict, Path, bool]:
    """The cache of 3 + 3 train and val images, through a stand-in backbone (a linear map of
    pooled pixels: the format, not the network, is under test)."""
    from torchvision.transforms import v2

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    job = cache_module.Extraction(
        backbone, tiny_splits(image_folder), transform, transform, views=1, dtype=torch.float32,
        device=torch.device("cpu"), seed=0, batch_size=4, num_workers=0, **kwargs,
    )  # fmt: skip
    return cache_module.load_or_build(job, directory)


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory map holds `tensor`'s data, if any (from /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.parametrize("damage", ["garbage", "old_format", "truncated", "no_meta", "labels"])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path: Path, image_folder: Path, damage: str) -> None:
    """The cache of the same key, damaged five ways: loading it rebuilds the same features."""
    built, path, reused = build_tiny(tmp_path / "cache", image_folder)
    first = {split: built[split].features.clone() for split in built}  # read before the damage
    assert not reused and build_tiny(tmp_path / "cache", image_folder)[2]  # built, then reused
    lock = path.name + ".lock"  # the lock's file stays, empty: see features.lock
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name, lock]  # no temporary
    features = store.features_file(path, "train")
    if damage == "garbage":
        features.write_bytes(b"not a cache")
    elif damage == "truncated":
        features.write_bytes(features.read_bytes()[:200])
    elif damage == "no_meta":  # as a writer leaves it before its last step
        (path / store.META).unlink()
    elif damage == "labels":
        np.save(store.labels_file(path, "val"), np.zeros(6, dtype=np.int64))
    else:
        meta = json.loads((path / store.META).read_text())
        (path / store.META).write_text(json.dumps({**meta, "format": 3}))
    second, again, reused = build_tiny(tmp_path / "cache", image_folder)
    assert again == path and not reused
    for split in ("train", "val"):
        torch.testing.assert_close(second[split].features, first[split], rtol=0, atol=0)
    assert json.loads((path / store.META).read_text())["format"] == store.FORMAT_VERSION


def test_the_cache_is_memory_mapped_files_beside_their_metadata(tmp_path: Path, image_folder: Path) -> None:
    """(views, N, D) features in .npy files, stored as computed (fp32 here), opened as maps of
    them (no copy in memory), labels beside them, shapes and dtypes in meta.json."""
    sets, path, _ = build_tiny(tmp_path / "cache", image_folder)
    meta = json.loads((path / store.META).read_text())
    assert meta["format"] == store.FORMAT_VERSION and meta["key"].startswith(path.name)
    train_features = np.load(store.features_file(path, "train"), mmap_mode="r")
    assert meta["splits"]["train"] == {"shape": list(train_features.shape), "dtype": "float32"}
    assert meta["splits"]["val"]["dtype"] == "float32" and train_features.shape == (1, 6, 8)
    assert np.load(store.labels_file(path, "train")).tolist() == [0, 0, 0, 1, 1, 1]
    opened = build_tiny(tmp_path / "cache", image_folder)[0]
    for split in ("train", "val"):
        assert mapped_file(opened[split].features) == str(store.features_file(path, split))
        assert torch.equal(opened[split].features, sets[split].features)


@pytest.mark.slow
def test_a_full_disk_ends_the_write_with_one_line_and_the_run_trains_uncached(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC when the space is reserved (before any image is decoded): CacheNotWritten, one
    line naming the directory and the fix; nothing is left that a later run would load."""
    import errno

    from transferkit.data.datamodule import ImageFolderDataModule
    from transferkit.features import FrozenFeatures
    from transferkit.training.finetune import Freeze

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(cache_module.CacheNotWritten) as error:
        build_tiny(tmp_path / "cache", image_folder)
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and str(tmp_path / "cache") in message
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]  # no temporary directory
    model = TransferModule(TINY_MODEL, ["circle", "square"], weights=None)
    datamodule = ImageFolderDataModule(image_folder, num_workers=0, image_size=32, augment=False)
    datamodule.preprocessing = model.preprocessing
    freeze = Freeze()
    freeze.freeze_before_training(model)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    with caplog.at_level("WARNING", logger="transferkit"):
        features = FrozenFeatures(dir=tmp_path / "cache")
        plan = features.plan(model, datamodule, trainer, freeze)
        used = use_feature_cache(features, plan, model, datamodule, trainer)
    assert used is None and datamodule.feature_sets is None
    assert "Training without a feature cache: The feature cache could not be written under" in caplog.text
    with pytest.raises(cache_module.CacheNotWritten):
        required = FrozenFeatures(cache=True, dir=tmp_path / "cache")
        use_feature_cache(
            required, required.plan(model, datamodule, trainer, freeze), model, datamodule, trainer
        )


@pytest.mark.slow
def test_checkpoint_of_a_cached_run_is_a_full_model(
    compose_train, tmp_path: Path, tiny_overrides: list[str], image_folder: Path
) -> None:
    results = train(compose_train(tmp_path, [*tiny_overrides, "data.augment=false"]))
    model = load_model(results["best_model_path"]).eval()
    calls = backbone_calls(model)
    accuracy, total = val_accuracy(model, image_folder)
    assert sum(calls) == total
    assert accuracy == pytest.approx(results["val/acc"], abs=1e-6)


@pytest.mark.slow
def test_views_cache_k_augmented_copies_and_draw_one_per_item(
    compose_train, tmp_path: Path, tiny_overrides: list[str], passes: list[int]
) -> None:
    results = train(compose_train(tmp_path, [*tiny_overrides, "features.views=3"]))
    train_features, val_features = (cached(results["feature_cache"], split) for split in ("train", "val"))
    assert train_features.shape[0] == 3 and val_features.shape[0] == 1
    assert not torch.equal(train_features[0], train_features[1])  # different augmentations
    assert train_features.dtype == val_features.dtype == torch.float32  # stored as computed
    labels = torch.from_numpy(np.load(store.labels_file(Path(results["feature_cache"]), "train")))
    feature_set = cache_module.FeatureSet(train_features, labels, seed=0)
    n = len(feature_set)
    assert torch.equal(feature_set[4 * n][0], feature_set[4 * n][0])  # a function of (seed, epoch, index)
    drawn = {tuple(feature_set[epoch * n][0].tolist()) for epoch in range(30)}
    assert len(drawn) == 3  # over the epochs, every view of item 0


@pytest.mark.slow
def test_cached_views_are_seeded_and_train_batch_png_shows_the_view_each_image_trains_on(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """Two builds under one key are identical, and the picture's images are the cached ones:
    through the backbone they give the features epoch 0 trains on."""
    from transferkit.features import FrozenFeatures
    from transferkit.tasks.train_outputs import training_batch
    from transferkit.training.finetune import Freeze

    overrides = [*tiny_overrides, "features.views=2", f"features.dir={tmp_path}/cache"]
    results = train(compose_train(tmp_path, overrides))
    assert results["augment"] == "basic"
    first = cached(results["feature_cache"], "train").clone()
    shutil.rmtree(results["feature_cache"])
    model = load_model(results["best_model_path"])
    datamodule = ImageFolderDataModule(tiny_overrides[1].split("=", 1)[1], num_workers=0, image_size=32)
    datamodule.preprocessing = model.preprocessing
    trainer = L.Trainer(accelerator="cpu", logger=False)
    freeze = Freeze()
    freeze.freeze_before_training(model)
    features = FrozenFeatures(views=2, dir=tmp_path / "cache")
    use_feature_cache(
        features, features.plan(model, datamodule, trainer, freeze, 42), model, datamodule, trainer
    )
    rebuilt = cached(results["feature_cache"], "train")
    assert torch.equal(first, rebuilt)

    images, labels = training_batch(datamodule, model, count=4)
    fed = [datamodule.feature_sets["train"][key] for key in list(range(len(rebuilt[0])))]
    with torch.no_grad():
        features = model.backbone.eval()(images)
    keys = EpochSampler(len(fed), 42)
    for row, key in enumerate(list(keys)[:4]):
        assert torch.allclose(features[row], fed[key][0], atol=2e-2, rtol=2e-2)  # fp16 storage
        assert labels[row] == int(fed[key][1])


@pytest.mark.slow
def test_a_run_says_and_records_that_one_cached_view_replaces_augmentation(
    compose_train, tmp_path: Path, tiny_overrides: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.tasks.train_outputs import training_batch

    with caplog.at_level("INFO", logger="transferkit"):
        cached = train(compose_train(tmp_path / "a", tiny_overrides))  # data.augment=basic, views=1
    assert cached["feature_cache"] and cached["augment"] is None
    assert "data.augment=basic is not applied: features are cached with 1 view" in caplog.text
    assert torch.load(cached["best_model_path"], weights_only=True)["transferkit"]["augment"] is None
    uncached = train(compose_train(tmp_path / "b", [*tiny_overrides, "features.cache=false"]))
    assert uncached["augment"] == "basic"

    model = load_model(cached["best_model_path"])
    datamodule = ImageFolderDataModule(tiny_overrides[1].split("=", 1)[1], num_workers=0, image_size=32)
    datamodule.preprocessing = model.preprocessing
    datamodule.use_features({"train": cache_module.FeatureSet(torch.zeros(1, 36, 4), torch.zeros(36))})
    images, _ = training_batch(datamodule, model, count=4)
    evaluate = model.preprocessing.transforms(train=False)
    train_files = datamodule.splits.train
    order = list(EpochSampler(36, 42))
    expected = torch.stack([evaluate(load_rgb(train_files[k][0])) for k in order[:4]])
    assert torch.equal(images, expected)  # what the cache holds: the evaluation transform


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["features.cache=true", "finetune=full"], "every block of the backbone trains in this run"),
        (["features.cache=true", "finetune.bn=train"], "finetune.bn=train trains BatchNorm in every block"),
        (["features.cache=true", "data.mixup_alpha=0.2"], "MixUp/CutMix mix images"),
        (["features.views=2", "data.augment=false"], "data.augment is off"),
        (["features.views=0"], "features.views=0"),
        (["features.cache=sometimes"], "features.cache='sometimes'"),
        (["features.precision=fp8"], "features.precision='fp8'"),
        (["features.max_gb=0"], "features.max_gb=0 must be a positive number of GB"),
    ],
)
def test_impossible_cache_settings_are_config_errors(
    compose_train, tmp_path: Path, tiny_overrides: list[str], overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        train(compose_train(tmp_path, [*tiny_overrides, *overrides]))


@pytest.mark.slow
def test_auto_skips_the_cache_when_the_backbone_trains(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    results = train(compose_train(tmp_path, [*tiny_overrides, "finetune=full"]))
    assert results["feature_cache"] is None and not (tmp_path / ".cache" / "features").exists()


def test_features_are_stored_so_that_they_read_back_as_computed() -> None:
    """fp32 results stay fp32; bf16 results are stored as fp16, which holds them exactly, unless
    a batch has a value fp16 cannot hold (past its range, or below its normals): then fp32."""
    assert cache_module.storage_dtype(torch.float32) == torch.float32
    assert cache_module.storage_dtype(torch.bfloat16) == torch.float16
    computed = (torch.randn(4, 16) * 3).bfloat16().float()
    stored = cache_module._stored(computed, torch.float16)
    assert stored.dtype == torch.float16 and torch.equal(stored.float(), computed)
    for value in (1e6, 1e-7):
        odd = computed.clone()
        odd[0, 0] = torch.tensor(value).bfloat16().float()
        stored = cache_module._stored(odd, torch.float16)
        assert stored.dtype == torch.float32 and torch.equal(stored, odd)


def test_bf16_frozen_forward_runs_the_backbone_in_bf16_and_hands_the_head_fp32(tmp_path: Path) -> None:
    """The backbone's own output is in the frozen dtype (so bf16 is what ran, not fp32 cast
    after), and what the head gets is fp32, close to the fp32 forward's."""
    model = TransferModule("timm:test_efficientnet", ["a", "b"], weights=None).eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    ran: list[torch.dtype] = []
    model.backbone.register_forward_hook(lambda module, inputs, output: ran.append(output.dtype))
    x = torch.randn(2, 3, 32, 32)
    model.frozen_dtype = torch.bfloat16
    features = model.features(x)
    model.frozen_dtype = torch.float32
    exact = model.features(x)
    assert ran == [torch.bfloat16, torch.float32]
    assert features.dtype == torch.float32 and not torch.equal(features, exact)
    assert torch.allclose(features, exact, atol=0.1, rtol=0.05)


def test_convolutional_backbones_run_channels_last() -> None:
    conv = TransferModule("timm:test_efficientnet", ["a", "b"], weights=None)
    assert conv.channels_last
    weight = next(p for p in conv.backbone.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    vit = TransferModule("timm:test_vit", ["a", "b"], weights=None)
    assert vit.channels_last  # its patch embedding is a convolution too; harmless elsewhere


@pytest.mark.slow
def test_results_name_the_cache_file(compose_train, tmp_path: Path, tiny_overrides: list[str]) -> None:
    cfg = compose_train(tmp_path, tiny_overrides)
    results = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert written["feature_cache"] == results["feature_cache"]
    assert Path(written["feature_cache"]).parent == tmp_path / ".cache" / "features"


@pytest.mark.slow
def test_bf16_mixed_trains_on_cpu(compose_train, tmp_path: Path, tiny_overrides: list[str]) -> None:
    """Lightning's bf16-mixed precision with a backbone that trains (no cache)."""
    results = train(
        compose_train(
            tmp_path,
            [*tiny_overrides, "trainer.precision=bf16-mixed", "finetune=partial", "features.cache=false"],
        )
    )
    assert results["feature_cache"] is None
    model = load_model(results["best_model_path"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def train_compiled(compose_train, root: Path, tiny_overrides: list[str]) -> None:
    """model.compile=true trains, and its checkpoint holds the plain backbone's state dict."""
    # batches of 12 divide train (36) and val (12): one shape to compile per mode, not two
    compiled = [
        "model.compile=true", "finetune=partial", "features.cache=false", "data.batch_size=12",
        "trainer.max_epochs=1",
    ]  # fmt: skip
    results = train(compose_train(root, [*tiny_overrides, *compiled]))
    checkpoint = torch.load(results["best_model_path"], map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in key or "_compiled" in key for key in checkpoint["state_dict"])
    model = load_model(results["best_model_path"])
    assert model.hparams.compile is True


@pytest.mark.slow
def test_compiled_backbone_trains_and_saves_a_plain_state_dict(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our side of torch.compile (graph capture, training, the checkpoint), with the eager
    backend: inductor's C++ code generation (a minute on 2 cores) runs in make test-models."""
    compiled: list[torch.nn.Module] = []
    real = torch.compile

    def eager(module: torch.nn.Module, **kwargs):
        compiled.append(module)
        return real(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager)
    train_compiled(compose_train, tmp_path, tiny_overrides)
    assert len(compiled) == 1 and compiled[0].__class__.__name__ != "TransferModule"  # the backbone


@pytest.mark.models
def test_inductor_compiled_backbone_trains_and_saves_a_plain_state_dict(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    train_compiled(compose_train, tmp_path, tiny_overrides)


def test_frozen_forward_on_cpu_runs_in_cache_sized_chunks() -> None:
    from transferkit.features.precision import cpu_chunk_size, frozen_forward

    model = TransferModule("timm:test_efficientnet", ["a", "b"], weights=None).eval()
    sizes: list[int] = []
    model.backbone.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])))
    images = torch.randn(3 * cpu_chunk_size() + 1, 3, 32, 32)
    chunked = frozen_forward(model.backbone, images, torch.float32)
    assert sizes == [cpu_chunk_size()] * 3 + [1]
    with torch.no_grad():
        whole = model.backbone(images)
    assert chunked.dtype == torch.float32 and torch.allclose(chunked, whole, atol=1e-5)


@pytest.mark.parametrize("cache", [0, 1, "sometimes"])
def test_cache_takes_auto_or_a_boolean_only(cache) -> None:
    """features.cache=0 reaches Python as the int 0, which equals False: it must not pass as auto."""
    from transferkit.features import FrozenFeatures

    with pytest.raises(ConfigError, match=f"features.cache={cache!r} must be auto, true or false"):
        FrozenFeatures(cache=cache)
    assert FrozenFeatures(cache=False).cache is False and FrozenFeatures().cache == "auto"

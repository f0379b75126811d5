"""Head epochs at memory speed: cached features served a whole batch at a time, in the image
loader's order, in batches that grow with the data; a run on them logs, checkpoints and resumes
as any other run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_sampling import recorded

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.sampling import EpochSampler, balanced_weights
from transferkit.errors import ConfigError
from transferkit.features import FeatureSet, FrozenFeatures
from transferkit.features import loading as loading_module
from transferkit.features.loading import head_batch_size
from transferkit.tasks.train import train
from transferkit.training.interrupts import Interrupted


def random_set(n: int = 36, views: int = 1, labels: torch.Tensor | None = None) -> FeatureSet:
    g = torch.Generator().manual_seed(n + views)
    features = torch.randn(views, n, 4, generator=g).half()
    return FeatureSet(features, torch.arange(n) % 2 if labels is None else labels, seed=7)


@pytest.mark.parametrize("views", [1, 3])
def test_a_batch_is_the_rows_one_at_a_time_would_give(views: int) -> None:
    multilabel = (torch.arange(36 * 3).reshape(36, 3) % 5 == 0).long()  # 0/1 rows
    dataset = random_set(views=views, labels=multilabel)
    keys = [5, 40, 77, 3, 110]  # keys of epochs 0 to 3 (epoch * 36 + index)
    features, labels = dataset[keys]
    one_by_one = [dataset[key] for key in keys]
    assert features.dtype == torch.float32
    assert torch.equal(features, torch.stack([f for f, _ in one_by_one]))
    assert torch.equal(labels, torch.stack([label for _, label in one_by_one]))


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_the_loaders_serve_the_image_order_in_whole_batches(
    image_folder: Path, balance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """36 training rows in batches of 16: 3 batches, in EpochSampler's order (shuffled, or drawn
    by class with balance=sampler), each one call with a list of keys; val in order."""
    datamodule = ImageFolderDataModule(image_folder, batch_size=8, num_workers=0, balance=balance)
    labels = torch.tensor([label for _, label in datamodule.splits.train])
    train_set, val_set = random_set(labels=labels), random_set(12)
    datamodule.use_features({"train": train_set, "val": val_set}, batch_size=16)
    calls: list[type] = []
    getitem = FeatureSet.__getitem__
    monkeypatch.setattr(
        FeatureSet, "__getitem__", lambda self, key: calls.append(type(key)) or getitem(self, key)
    )
    loader = datamodule.train_dataloader()
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [16, 16, 4] and calls == [list] * 3
    weights = balanced_weights(labels.tolist()) if balance == "sampler" else None
    order = torch.tensor(list(EpochSampler(36, 42, weights))) % 36
    assert torch.equal(torch.cat([x for x, _ in batches]), train_set.features[0][order].float())
    assert torch.equal(torch.cat([y for _, y in batches]), labels[order])
    assert datamodule.train_batch_size == 16
    val = list(datamodule.val_dataloader())
    assert [len(y) for _, y in val] == [12] and torch.equal(val[0][0], val_set.features[0].float())


def test_the_head_batch_grows_with_the_rows_to_keep_an_epoch_short() -> None:
    assert head_batch_size(36, 8, 4096) == 8  # small data trains as on images
    assert head_batch_size(8192, 32, 4096) == 32
    assert head_batch_size(100_000, 32, 4096) == 391  # 256 steps an epoch
    assert head_batch_size(1_000_000, 32, 4096) == 3907
    assert head_batch_size(10_000_000, 32, 4096) == 4096  # at most features.batch_size
    assert head_batch_size(100_000, 32, 64) == 64


@pytest.mark.parametrize("batch_size", [0, -8])
def test_features_batch_size_must_be_positive(batch_size: int) -> None:
    with pytest.raises(ConfigError, match=f"features.batch_size={batch_size} must be a positive integer"):
        FrozenFeatures(batch_size=batch_size)


@pytest.mark.slow
def test_a_run_on_grown_head_batches_logs_checkpoints_and_resumes_exactly(
    compose_train,
    tmp_path: Path,
    tiny_overrides: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With 3 steps an epoch (HEAD_STEPS patched), 36 rows train in batches of 12. Interrupted
    after 2 of epoch 1's 3 batches and resumed, the two runs train the uninterrupted run's
    batches row for row and end with its metrics."""
    monkeypatch.setattr(loading_module, "HEAD_STEPS", 3)
    common = [*tiny_overrides, "data.augment=false", "test=false", "trainer.max_epochs=3"]
    common += ["+callbacks.record._target_=test_sampling.RecordSamples", f"features.dir={tmp_path}/cache"]
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("full", "part", "rest")}
    with caplog.at_level("INFO", logger="transferkit"):
        full = train(compose_train(tmp_path / "a", [*common, f"+callbacks.record.path={logs['full']}"]))
    assert "The head trains on cached features in batches of 12 (36 rows" in caplog.text
    signalled = ["+callbacks.signal._target_=helpers.SendSignal", "+callbacks.signal.at_step=4"]
    with pytest.raises(Interrupted):
        train(compose_train(tmp_path / "b", [*common, *signalled, f"+callbacks.record.path={logs['part']}"]))
    checkpoint = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5 and checkpoint["ImageFolderDataModule"] == {
        "epoch": 1,
        "samples_trained": 24,
    }
    rest = train(
        compose_train(tmp_path / "b", [*common, "ckpt_path=last", f"+callbacks.record.path={logs['rest']}"])
    )
    (whole, validated), (part, _), (after, _) = (recorded(logs[name]) for name in logs)
    assert validated == [0, 1, 2] and [len(whole[e]) for e in whole] == [36, 36, 36]
    assert part[0] == whole[0] and part[1] + after[1] == whole[1] and after[2] == whole[2]
    assert rest["val/loss"] == full["val/loss"] and rest["feature_cache"] == full["feature_cache"]
    metrics = (tmp_path / "a" / "run" / "metrics.csv").read_text()
    assert "train/loss" in metrics and (tmp_path / "a" / "run" / "checkpoints" / "best.ckpt").is_file()

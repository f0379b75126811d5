"""The feature cache built by several processes: each extracts its batches, the shards assemble
into the single-process cache byte for byte, and nothing is published until every shard is
there; under DDP (trainer=ddp_sim) the run trains on it as one process would."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_image_folder, run_cli, tiny_run
from test_features import tiny_splits

from transferkit.features import store
from transferkit.features.cache import CacheNotWritten, Extraction, batch_keys
from transferkit.tasks.train import train, use_feature_cache


def stand_in(image_folder: Path, batch_size: int = 2) -> Extraction:
    """3 + 3 images per split through a linear map of pooled pixels (the bytes, not the
    network, are under test), in batches of 2: 3 batches a split, so 2 ranks get 2 and 1."""
    from torchvision.transforms import v2

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    return Extraction(
        backbone, tiny_splits(image_folder), transform, transform, views=1, dtype=torch.float32,
        device=torch.device("cpu"), seed=0, batch_size=batch_size, num_workers=0,
    )  # fmt: skip


def test_each_rank_takes_every_world_th_batch() -> None:
    assert batch_keys(7, 2, rank=0, world=2) == [0, 1, 4, 5]
    assert batch_keys(7, 2, rank=1, world=2) == [2, 3, 6]
    assert batch_keys(7, 2, rank=1, world=2, offset=7) == [9, 10, 13]  # view 1 of an augmented split
    assert batch_keys(3, 4, rank=1, world=2) == []


def test_shards_of_two_ranks_assemble_into_the_single_process_cache(
    tmp_path: Path, image_folder: Path
) -> None:
    job = stand_in(image_folder)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    job.write_shards(one)
    job.assemble(one, world=1)
    for rank in (0, 1):
        job.write_shards(two, rank=rank, world=2)
    assert store.open_array(store.features_file(two, "train", 1)).shape == (1, 2, 8)  # its one batch
    job.assemble(two, world=2)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in sorted(p.name for p in one.iterdir()):
        assert filecmp.cmp(one / name, two / name, shallow=False), name


def test_a_missing_shard_publishes_nothing(tmp_path: Path, image_folder: Path) -> None:
    """Rank 1 died (its shards never written): assembling refuses, and no cache appears under the
    key (the temporary directory is all there is)."""
    from transferkit.features.parallel import ParallelCache

    job = stand_in(image_folder)
    cache = ParallelCache(job, tmp_path / "cache", attach=lambda sets: None)
    tmp = store.temporary_dir(cache.path)
    tmp.mkdir(parents=True)
    job.write_shards(tmp, rank=0, world=2)
    with pytest.raises(CacheNotWritten, match="Rank 1's part of the feature cache is not in"):
        cache._assemble(tmp, world=2)
    assert not cache.path.exists() and store.read_meta(cache.path, cache.key) is None


@pytest.mark.slow
def test_a_ddp_run_builds_the_cache_in_parallel_and_trains_as_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trainer=ddp_sim (2 gloo processes), fp32: the cache both ranks built is the one a single
    process builds, file for file and byte for byte; training on it with batches of 4 per rank
    gives the metrics of one process with batches of 8 (the same samples in every step), and
    val (9 images: Lightning's own sampler would pad it to 10) counts every image once."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # kernels round by their thread count: one everywhere
    data = make_image_folder(tmp_path / "data", splits={"train": 6, "val": 3})
    common = ["features.precision=fp32", "data.augment=false", "test=false", "trainer.max_epochs=2"]
    proc = run_cli(
        "train.py",
        *tiny_run(data, trainer="ddp_sim"),
        *common,
        "data.batch_size=4",
        f"features.dir={tmp_path}/ddp",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    ddp = json.loads((run_dir / "results.json").read_text())
    assert "Feature cache written by 2 processes" in (run_dir / "train.log").read_text()

    from conftest import compose_task

    from transferkit.data.datamodule import ImageFolderDataModule
    from transferkit.features import FrozenFeatures
    from transferkit.runs.checkpoints import load_model
    from transferkit.training.finetune import Freeze

    model = load_model(ddp["best_model_path"])  # its frozen backbone: the weights both ranks cached with
    datamodule = ImageFolderDataModule(data, batch_size=4, num_workers=0, image_size=32, augment=False)
    datamodule.preprocessing = model.preprocessing
    freeze = Freeze()
    freeze.freeze_before_training(model)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        features = FrozenFeatures(dir=tmp_path / "single")
        plan = features.plan(model, datamodule, trainer, freeze, 42)
        single = use_feature_cache(features, plan, model, datamodule, trainer)
    finally:
        torch.set_num_threads(threads)
    built = Path(ddp["feature_cache"])
    assert single.name == built.name  # the same key
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in built.iterdir()) and "train.features.npy" in names
    for name in names:
        assert filecmp.cmp(single / name, built / name, shallow=False), name

    # one process, batches of 8, on that cache: the steps the two ranks took together
    overrides = [*tiny_run(data), *common, "data.batch_size=8", f"features.dir={built.parent}"]
    one = train(compose_task("train", tmp_path / "one", overrides))
    assert one["feature_cache"] == ddp["feature_cache"]
    assert ddp["val/acc"] == one["val/acc"]
    assert ddp["val/loss"] == pytest.approx(one["val/loss"], abs=1e-5)

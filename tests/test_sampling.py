"""The training order and its DDP shards: each rank's share of one order that is a function of
(seed, epoch), a len() that Lightning can count a resumed epoch by, and a resume that skips
exactly what was trained, whatever the batch size it resumes with."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import make_image_folder
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.loops.progress import _BatchProgress
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch.utils.data import DataLoader, DistributedSampler

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.sampling import EpochSampler
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.train import train
from transferkit.training.interrupts import Interrupted

SEED = 7
TRAINING = RunningStage.TRAINING


def as_lightning_runs_it(loader: DataLoader, world: int, rank: int, stage: RunningStage) -> DataLoader:
    """The loader Lightning iterates on `rank` of `world` processes: it replaces the sampler of
    one that is not a DistributedSampler with its own (`_requires_distributed_sampler`)."""
    if world == 1 or isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = _get_distributed_sampler(
        loader,
        shuffle=stage == TRAINING,
        overfit_batches=0,
        mode=stage,
        num_replicas=world,
        rank=rank,
        seed=SEED,
    )
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler)


def shards(
    n: int, world: int, epoch: int = 0, skip: int = 0, weights: torch.Tensor | None = None, seed: int = SEED
) -> list[list[int]]:
    """Every rank's keys of `epoch`, from the loader Lightning runs, set to the epoch as Lightning
    sets it (`_set_sampler_epoch` on the loader)."""
    keys = []
    for rank in range(world):
        sampler = EpochSampler(n, seed, weights, skip=skip, num_replicas=world, rank=rank)
        loader = as_lightning_runs_it(DataLoader(range(n), sampler=sampler), world, rank, TRAINING)
        _set_sampler_epoch(loader, epoch)
        keys.append(list(loader.sampler))
        assert len(loader.sampler) == math.ceil(n / world)  # the epoch's length, skipped or not
    return keys


def interleaved(keys: list[list[int]]) -> list[int]:
    """The global order the ranks' shards make: position i went to rank i % world."""
    return [key for batch in zip(*keys, strict=False) for key in batch]


# The orders one process trained on (12 images, SEED) before DDP-aware sampling existed, as
# recorded then: a change of the sampler that moves them would change every earlier run's resume.
ORDERS = {
    0: [5, 8, 6, 9, 1, 2, 3, 7, 0, 10, 11, 4],
    3: [46, 45, 37, 40, 47, 39, 42, 44, 43, 38, 41, 36],
}
DRAWN = {  # the same, class-balanced (weights 1, 2, 3)
    0: [8, 2, 11, 10, 8, 7, 6, 0, 7, 11, 8, 4],
    3: [40, 41, 45, 37, 46, 37, 46, 38, 38, 43, 38, 38],
}


def test_one_process_keeps_its_order() -> None:
    """The order a run trained on before DDP-aware sampling existed, bit for bit."""
    weights = torch.tensor([1.0, 2.0, 3.0] * 4, dtype=torch.float64)
    for epoch in (0, 3):
        assert shards(12, 1, epoch) == [ORDERS[epoch]]
        assert shards(12, 1, epoch, skip=5) == [ORDERS[epoch][5:]]
        assert shards(12, 1, epoch, weights=weights) == [DRAWN[epoch]]


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_share_out_the_one_process_order(world: int) -> None:
    single = shards(12, 1, epoch=2)[0]
    keys = shards(12, world, epoch=2)
    assert len({len(k) for k in keys}) == 1  # every rank steps as often
    assert sorted(interleaved(keys)) == list(range(24, 36))  # all of epoch 2, none twice
    assert interleaved(keys) == single


def test_an_uneven_epoch_pads_the_last_round_only() -> None:
    """DDP needs every rank to step as often: 13 samples on 2 ranks train one of them twice."""
    keys = shards(13, 2)
    assert [len(k) for k in keys] == [7, 7]
    flat = interleaved(keys)
    assert set(flat) == set(range(13)) and len(flat) == 14
    assert flat[:13] == shards(13, 1)[0] and flat[13] == flat[0]


def test_every_epoch_has_its_own_order_under_ddp() -> None:
    """Lightning calls set_epoch on the loader's sampler; the order and the keys (which seed the
    augmentation) must follow the epoch on every rank."""
    orders = {}
    for epoch in range(3):
        keys = shards(12, 2, epoch)
        assert all(key // 12 == epoch for shard in keys for key in shard)
        orders[epoch] = [key % 12 for key in interleaved(keys)]
        assert shards(12, 2, epoch) == keys  # a function of (seed, epoch)
    assert len({tuple(order) for order in orders.values()}) == 3
    assert shards(12, 2, 1, seed=SEED + 1) != shards(12, 2, 1)


def test_lightning_uses_the_sampler_as_it_is() -> None:
    """Lightning swaps a sampler that is not a DistributedSampler for its DistributedSamplerWrapper,
    which trusts len() and so fails on a resumed epoch (IndexError)."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    ours = DataLoader(range(12), sampler=EpochSampler(12, SEED, skip=4, num_replicas=2, rank=0))
    assert not trainer._data_connector._requires_distributed_sampler(ours)
    assert trainer._data_connector._requires_distributed_sampler(DataLoader(range(12)))


@pytest.mark.parametrize(("n", "world"), [(12, 2), (13, 2), (13, 3), (12, 5)])
def test_len_counts_the_batches_lightning_counts(n: int, world: int) -> None:
    """Lightning measures len() once, then counts a resumed epoch's batches from the ones done
    before the interruption: both must add up to the epoch, on every rank."""
    batch = 2
    for done in range(math.ceil(n / world) // batch):
        for keys in shards(n, world, epoch=1, skip=done * batch * world):
            loader = DataLoader(keys, batch_size=batch)
            assert done + len(list(loader)) == math.ceil(math.ceil(n / world) / batch)


@pytest.mark.parametrize("n", [12, 13])
def test_a_ddp_resume_skips_exactly_what_every_rank_trained(n: int) -> None:
    """After k batches of b on each of 2 ranks, k * b * 2 samples of the global order are done."""
    batch, world = 2, 2
    full = shards(n, world, epoch=1)
    for k in (1, 2, 3):
        resumed = shards(n, world, epoch=1, skip=k * batch * world)
        assert resumed == [shard[k * batch :] for shard in full]


def test_the_skip_applies_to_one_epoch_only() -> None:
    sampler = EpochSampler(12, SEED, skip=8)
    sampler.set_epoch(1)
    assert len(list(sampler)) == 4
    sampler.set_epoch(2)
    assert len(sampler) == 12 and sorted(sampler) == list(range(24, 36))


def test_a_balanced_draw_is_shared_out_too() -> None:
    weights = torch.tensor([1.0] * 9 + [6.0] * 3, dtype=torch.float64)
    keys = shards(12, 2, epoch=1, weights=weights)
    assert interleaved(keys) == shards(12, 1, epoch=1, weights=weights)[0]


def fingerprint(image: torch.Tensor) -> str:
    """Tells samples apart: their augmented pixels are a function of (seed, epoch, index)."""
    return hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()[:16]


class RecordSamples(L.Callback):
    """Appends `[epoch, [fingerprint of each trained sample]]` to `path` after each batch, and
    `[epoch, "validated"]` after each validation in fit; under DDP, each rank to `<path>.rank<r>.jsonl`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _write(self, trainer: L.Trainer, entry: list) -> None:
        path = self.path
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
        with path.open("a") as file:
            file.write(json.dumps(entry) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out, batch, i) -> None:
        self._write(trainer, [trainer.current_epoch, [fingerprint(image) for image in batch[0]]])

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._write(trainer, [trainer.current_epoch, "validated"])


def one_process_order(checkpoint: Path, root: Path, epochs: int, seed: int = 42) -> dict[int, list[str]]:
    """The fingerprints of what one process trains in each epoch: the sampler's order through
    the training set, augmented as the checkpoint's model preprocesses (data.image_size=32)."""
    datamodule = ImageFolderDataModule(root, num_workers=0, image_size=32, seed=seed)
    datamodule.preprocessing = load_model(checkpoint).preprocessing
    datamodule.setup()
    dataset = datamodule.datasets["train"]
    sampler = EpochSampler(len(dataset), seed)
    order = {}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order[epoch] = [fingerprint(dataset[key][0]) for key in sampler]
    return order


def recorded(path: Path) -> tuple[dict[int, list[str]], list[int]]:
    """The fingerprints of the samples trained in each epoch, in order; the epochs validated."""
    epochs: dict[int, list[str]] = {}
    validated = []
    for line in path.read_text().splitlines():
        epoch, prints = json.loads(line)
        if prints == "validated":
            validated.append(epoch)
        else:
            epochs.setdefault(epoch, []).extend(prints)
    return epochs, validated


def resumed_datamodule(tmp: Path, batch_size: int, state: dict | None, done: int) -> ImageFolderDataModule:
    """A datamodule (36 training images) under a trainer restarting epoch 1 of a run that
    had trained `done` batches of it, as Lightning leaves things when it calls train_dataloader."""
    folder = make_image_folder(tmp / "data")
    datamodule = ImageFolderDataModule(folder, batch_size=batch_size, num_workers=0, image_size=32)
    progress = _BatchProgress()
    for _ in range(done):
        progress.increment_ready()
        progress.increment_started()
        progress.increment_processed()
        progress.increment_completed()
    fit_loop = SimpleNamespace(restarting=True, epoch_loop=SimpleNamespace(batch_progress=progress))
    datamodule.trainer = SimpleNamespace(
        fit_loop=fit_loop,
        current_epoch=1,
        distributed_sampler_kwargs=None,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    if state is not None:
        datamodule.load_state_dict(state)
    return datamodule


@pytest.mark.parametrize(("batch_size", "expected_done"), [(4, 4), (8, 2), (2, 8), (32, 1)])
def test_a_resume_skips_what_was_trained_whatever_the_batch_size(
    tmp_path: Path, batch_size: int, expected_done: int
) -> None:
    """16 samples trained in 4 batches of 4: with batches of 8 Lightning must count 2 done of 5
    (36 = 8 + 8 + 8 + 8 + 4), with 2 it must count 8 of 18, so the epoch ends where it does."""
    datamodule = resumed_datamodule(tmp_path, batch_size, {"epoch": 1, "samples_trained": 16}, done=4)
    loader = datamodule.train_dataloader()
    assert loader.sampler.epoch == 1  # loader workers draw the order before set_epoch is called
    batches = [len(labels) for _, labels in loader]  # the skip applies to this first pass
    assert sum(batches) == 20
    progress = datamodule.trainer.fit_loop.epoch_loop.batch_progress
    assert progress.current.completed == progress.current.processed == expected_done
    assert expected_done + len(batches) == len(loader)
    assert datamodule.state_dict() == {"epoch": 1, "samples_trained": 16}
    progress.increment_processed()
    assert datamodule.state_dict() == {"epoch": 1, "samples_trained": 16 + batch_size}
    datamodule.trainer.current_epoch = 2  # the next epoch starts from nothing
    progress.reset_on_run()
    assert datamodule.state_dict() == {"epoch": 2, "samples_trained": 0}


def test_a_checkpoint_that_recorded_nothing_counts_the_batches_done(tmp_path: Path) -> None:
    datamodule = resumed_datamodule(tmp_path, 4, None, done=4)
    assert len(list(datamodule.train_dataloader().sampler)) == 20


@pytest.mark.slow
def test_a_run_resumed_with_another_batch_size_trains_exactly_the_rest_of_the_epoch(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """Interrupted with batch size 4 after 4 batches of epoch 1, resumed with 8 and loader
    workers (which draw the order as soon as the loader starts): the two runs together train
    the uninterrupted run's epochs sample for sample, and validate after each."""
    mine = ("data.batch_size=", "data.num_workers=", "trainer.max_epochs=")
    common = [*(o for o in tiny_overrides if not o.startswith(mine)), "features.cache=false", "test=false"]
    common += ["trainer.max_epochs=3", "+callbacks.record._target_=test_sampling.RecordSamples"]
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("full", "part", "rest")}
    batch4 = [*common, "data.batch_size=4", "data.num_workers=0"]
    train(compose_train(tmp_path / "a", [*batch4, f"+callbacks.record.path={logs['full']}"]))
    signalled = ["+callbacks.signal._target_=helpers.SendSignal", "+callbacks.signal.at_step=12"]
    with pytest.raises(Interrupted):
        train(compose_train(tmp_path / "b", [*batch4, *signalled, f"+callbacks.record.path={logs['part']}"]))
    checkpoint = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 13 and checkpoint["epoch"] == 1  # 9 batches in epoch 0, 4 in 1
    assert checkpoint["ImageFolderDataModule"] == {"epoch": 1, "samples_trained": 16}
    resumed = [*common, "data.batch_size=8", "data.num_workers=2", "ckpt_path=last"]
    train(compose_train(tmp_path / "b", [*resumed, f"+callbacks.record.path={logs['rest']}"]))
    (full, validated), (part, _), (rest, revalidated) = (recorded(logs[name]) for name in logs)
    assert validated == [0, 1, 2] and revalidated == [1, 2]
    assert part[0] == full[0] and len(part[1]) == 16
    assert part[1] + rest[1] == full[1] and rest[2] == full[2]

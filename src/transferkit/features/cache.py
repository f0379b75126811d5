"""Backbone features computed once and kept on disk, so a frozen backbone costs one forward pass.

The same holds for a frozen prefix of the backbone (the blocks below the lowest one that trains,
see `features.prefix`): its activations at the boundary are cached, and only the top runs each
epoch.

The cache (a directory of memory-mapped files, `features.store`) is named by a key of everything
that changes the features: the backbone's (or the prefix's) weights (a hash of its tensors), the
preprocessing and transforms, every image's path, size and modification time, the number of
views, the precision, the runtime that computed them (onnxruntime and its version, or PyTorch),
for augmented views the seed, and for a prefix the boundary (block and node) and the prefix's
code. A cache whose key, format or shapes do not check out is rebuilt, never trusted; one run
writes it (`features.lock`) while others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.data.images import ImageListDataset
from transferkit.data.sampling import epoch_seed
from transferkit.errors import DataError
from transferkit.features import store
from transferkit.features.decode import EncodedImages, decode_batch, encoded_batch
from transferkit.features.lock import CacheLock
from transferkit.features.precision import frozen_forward
from transferkit.features.store import FORMAT_VERSION
from transferkit.files import link_or_copy
from transferkit.runtime import TORCH

log = logging.getLogger(__name__)

# What the frozen part computed, stored so that it reads back as computed: the cache must never
# change what trains. fp32 stays fp32 (fp16 rounding would lead the head, or a prefix's top,
# away from the uncached run); bf16 or fp16 results are stored as fp16, which holds them
# exactly in its range (`_stored` widens a batch to fp32 where it would not).


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """What features (or a prefix's activations) computed in `dtype` are stored as: fp16 when
    computed in half precision, else fp32, for every split: val's and test's metrics are the
    model's own, and what trains is what the uncached run sees."""
    return torch.float32 if dtype == torch.float32 else torch.float16


class FeatureSet(Dataset):
    """Cached features of one split: (views, N, D) features, or (views, N, ...) activations of a
    prefix, and N labels.

    With several views (augmented copies of each training image), each draw picks one, as a
    function of (seed, epoch, index) for the `epoch * N + index` keys EpochSampler yields, so
    every epoch sees a different augmentation of each image, reproducibly.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, seed: int | None = None) -> None:
        self.features, self.labels, self.seed = features, labels, seed

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def views(self) -> int:
        return self.features.shape[0]

    def view(self, epoch: int, index: int) -> int:
        """Which cached view of image `index` epoch `epoch` trains on."""
        if self.views == 1:
            return 0
        return random.Random(epoch_seed(self.seed or 0, epoch, index)).randrange(self.views)

    def subset(self, indices: list[int]) -> FeatureSet:
        """The images at `indices` (a cross-validation fold of the cached pool)."""
        rows = torch.tensor(indices, dtype=torch.long)
        return FeatureSet(self.features[:, rows], self.labels[rows], self.seed)

    def __getitem__(self, key: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One row, or with a list of keys (`features.loading`) the batch of them, sliced at once."""
        if isinstance(key, list):
            return self.batch(key)
        epoch, index = divmod(key, len(self))
        return self.features[self.view(epoch, index), index].float(), self.labels[index]

    def batch(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `keys` (as `__getitem__` gives them one by one), stacked."""
        indices = torch.tensor(keys, dtype=torch.long) % len(self)
        if self.views == 1:
            rows = self.features[0][indices]
        else:
            views = torch.tensor([self.view(key // len(self), key % len(self)) for key in keys])
            rows = self.features[views, indices]
        return rows.float(), self.labels[indices]


def label_tensor(items: list[tuple[Path, Any]]) -> torch.Tensor:
    """The labels of `items`: (N,) class indices, or (N, C) 0/1 for multi-label data."""
    return torch.tensor([label for _, label in items], dtype=torch.long)


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every tensor of `model`: the same name with other weights is another key."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _files(items: list[tuple[Path, int]]) -> list[list[Any]]:
    signature = []
    for path, label in items:
        stat = os.stat(path)
        signature.append([str(path), label, stat.st_size, stat.st_mtime_ns])
    return signature


def cache_key(
    backbone: nn.Module,
    splits: dict[str, list[tuple[Path, int]]],
    transforms: dict[str, str],
    views: int,
    dtype: torch.dtype,
    seed: int | None,
    boundary: dict[str, Any] | None = None,
    runtime: str = TORCH,
) -> str:
    """The key of a cache; without `boundary` (the whole backbone's features) and computed by
    PyTorch as it has always been, so existing caches stay valid."""
    payload: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "weights": weights_fingerprint(backbone),
        "transforms": transforms,
        "files": {split: _files(items) for split, items in splits.items()},
        "views": views,
        "precision": str(dtype),
        "seed": seed if views > 1 else None,
    }
    if boundary is not None:
        payload.update(boundary=boundary)
    if runtime != TORCH:
        payload.update(runtime=runtime)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class CacheNotWritten(DataError):
    """The cache could not be written (a full disk, no permission): the run can train without it."""


def load(path: Path, key: str, splits: dict[str, list[tuple[Path, int]]]) -> dict[str, FeatureSet] | None:
    """The cached sets, memory-mapped, or None when there is no usable cache (missing,
    incomplete, another format or key, files that do not match the metadata or the file list)."""
    if not path.is_dir():
        return None
    meta = store.read_meta(path, key)
    try:
        if meta is None:
            raise ValueError(f"no complete {store.META} of format {store.FORMAT_VERSION} and this key")
        sets = {}
        for split, items in splits.items():
            features, labels = store.open_split(path, split, meta)
            if (
                features.ndim < 3
                or features.shape[1] != len(items)
                or not torch.equal(labels, label_tensor(items))
            ):
                raise ValueError(f"{split} does not match the file list")
            sets[split] = FeatureSet(features, labels)
        return sets
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("Feature cache %s is unusable (%s); rebuilding it.", path, error)
        return None


def _stored(values: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """`values` as `storage`, or as fp32 where `storage` would not hold them exactly (bf16
    values past fp16's range, such as a randomly initialised prefix's, or below its normals)."""
    stored = values.to(storage)
    if storage != values.dtype and not torch.equal(stored.to(values.dtype), values):
        stored = values.to(torch.float32)
    return stored.cpu().contiguous()


@torch.no_grad()
def extract(
    backbone: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress,
    description: str,
    shard: store.Shard,
    view: int,
    channels_last: bool = False,
    storage: torch.dtype = torch.float32,
    decoded: Callable[[Any], torch.Tensor] | None = None,
    runtime: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Write the loader's images' features, in loader order, into `shard`'s `view` as `storage`;
    returns how many images ran. `decoded` makes images of what the loader yields (encoded
    files, decoded on the GPU: `features.decode`); `runtime` computes them in place of
    `backbone` (its onnxruntime session, on the CPU)."""
    done = 0
    task = progress.add_task(description, total=len(loader.sampler))
    for inputs, _ in loader:
        images = inputs if decoded is None else decoded(inputs)
        if runtime is not None:
            shard.write(view, done, _stored(frozen_forward(runtime, images, dtype), storage))
            done += len(images)
            progress.advance(task, len(images))
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        shard.write(view, done, _stored(frozen_forward(backbone, images, dtype), storage))
        done += len(images)
        progress.advance(task, len(images))
    return done


def batch_keys(n: int, batch_size: int, rank: int, world: int, offset: int = 0) -> list[int]:
    """Rank `rank`'s batches of keys `offset .. offset + n`: batches rank, rank + world, ...,
    each the batch one process would run, so its features are the same bytes whoever computes
    them (batched kernels may round differently in another batch)."""
    keys: list[int] = []
    for start in range(rank * batch_size, n, world * batch_size):
        keys.extend(range(offset + start, offset + min(start + batch_size, n)))
    return keys


@dataclass
class Extraction:
    """What to compute: `backbone` (or a prefix of it cut at `boundary`) over every split's
    images; train through `train_transform` with `views` > 1 (view v of image i augmented as
    key v * N + i), else every split through `eval_transform`; every split in `dtype` (fp32
    for a prefix: `features.precision.run_precision`), by `runtime` where the run has one (the
    backbone's or prefix's onnxruntime session: `FrozenFeatures.use_runtime`)."""

    backbone: nn.Module
    splits: dict[str, list[tuple[Path, Any]]]
    train_transform: Any
    eval_transform: Any
    views: int
    dtype: torch.dtype
    device: torch.device
    seed: int | None
    batch_size: int
    num_workers: int
    channels_last: bool = False
    boundary: dict[str, Any] | None = None
    decode: str = "pil"  # or a device: evaluation passes decode JPEGs there (`features.decode`)
    runtime: Any = None  # a callable computing `backbone` (an OnnxModule); None: PyTorch

    @property
    def runtime_name(self) -> str:
        return TORCH if self.runtime is None else self.runtime.name

    @property
    def same(self) -> bool:
        """Cross-validation caches one pool as train and as val: with one view both are the
        evaluation transform's features of the same images, computed once (train's file is
        val's, linked)."""
        return self.views == 1 and self.splits.get("train") == self.splits.get("val")

    def passes(self, split: str) -> int:
        return self.views if split == "train" and self.views > 1 else 1

    def write_shards(self, directory: Path, rank: int = 0, world: int = 1) -> None:
        """This rank's batches of every split into `directory` (one process: the whole files)."""
        original_device = next(self.backbone.parameters()).device
        modes = {m: m.training for m in self.backbone.modules()}  # a prefix shares the model's modules
        self.backbone.eval().to(self.device)
        order = sorted(self.splits, key=lambda s: s != "val") if self.same else list(self.splits)
        try:
            with Progress(transient=False, disable=rank != 0) as progress:
                for split in order:
                    self._write_split(split, directory, rank, world, progress)
        finally:
            self.backbone.to(original_device)
            for module, mode in modes.items():
                module.training = mode

    def _write_split(
        self,
        split: str,
        directory: Path,
        rank: int,
        world: int,
        progress: Progress,
    ) -> None:
        items, passes = self.splits[split], self.passes(split)
        keys = batch_keys(len(items), self.batch_size, rank, world)
        own = rank if world > 1 else None  # one process writes the whole file
        shard = store.Shard(store.features_file(directory, split, own), passes, len(keys))
        storage = storage_dtype(self.dtype)
        if self.same and split == "train":  # the same images, transform and storage as val's
            if keys:
                link_or_copy(
                    store.features_file(directory, "val", own), store.features_file(directory, split, own)
                )
            return
        dataset = ImageListDataset(items, self.train_transform, self.seed) if passes > 1 else None
        encoded = dataset is None and self.decode != "pil"
        for v in range(passes):
            loader = DataLoader(
                dataset
                or (EncodedImages(items) if encoded else ImageListDataset(items, self.eval_transform)),
                batch_size=self.batch_size,
                sampler=[key + v * len(items) for key in keys] if dataset else keys,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda" and not encoded,
                collate_fn=encoded_batch if encoded else None,
            )
            extract(
                self.backbone,
                loader,
                device=self.device,
                dtype=self.dtype,
                progress=progress,
                description=f"Caching {split} {'activations' if self.boundary else 'features'}"
                + (f" (view {v + 1}/{passes})" if passes > 1 else ""),
                shard=shard,
                view=v,
                channels_last=self.channels_last,
                storage=storage,
                decoded=self._decoded if encoded else None,
                runtime=self.runtime,
            )
        shard.close()

    def _decoded(self, data: Any) -> torch.Tensor:
        """Images of a batch of encoded files, decoded on `decode`'s device."""
        return decode_batch(data, self.eval_transform, self.decode)

    def assemble(self, directory: Path, world: int) -> None:
        """Every split's whole file from the ranks' shards (batch b is rank b % world's), and the
        labels beside it; one process wrote the whole files already."""
        for split, items in self.splits.items():
            store.write_labels(directory, split, label_tensor(items))
            if world == 1:
                continue
            shards = [store.features_file(directory, split, rank) for rank in range(world)]
            arrays = [store.open_array(path) if path.exists() else None for path in shards]
            whole = store.Shard(store.features_file(directory, split), self.passes(split), len(items))
            widest = max((a for a in arrays if a is not None), key=lambda a: a.dtype.itemsize).dtype
            for batch, start in enumerate(range(0, len(items), self.batch_size)):
                rows = arrays[batch % world][:, (batch // world) * self.batch_size :][:, : self.batch_size]
                for view in range(self.passes(split)):
                    whole.write(view, start, torch.from_numpy(np.array(rows[view], dtype=widest)))
            whole.close()
            del arrays
            for path in shards:
                path.unlink(missing_ok=True)


def not_written(directory: Path, error: OSError) -> CacheNotWritten:
    return CacheNotWritten(
        f"The feature cache could not be written under {directory} ({error.strerror or error}); "
        "free space there or point features.dir at a disk with room, or set features.cache=false."
    )


def load_or_build(job: Extraction, directory: str | Path) -> tuple[dict[str, FeatureSet], Path, bool]:
    """`job`'s cache under `directory`, loaded or built by this process; another run writing
    it is waited for. Raises CacheNotWritten when the disk refuses it."""
    splits = job.splits
    key = job_key(job)
    path = cache_path(directory, key)
    sets = load(path, key, splits)
    if sets is not None:
        log.info("Feature cache reused: %s", path)
        return sets, path, True
    lock = CacheLock(path)
    try:
        sets = claim(lock, path, key, splits)
        if sets is not None:
            return sets, path, True
        tmp = store.temporary_dir(path)
        try:
            tmp.mkdir()
            job.write_shards(tmp)
            job.assemble(tmp, world=1)
            store.publish(tmp, path, key, list(splits))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as error:
        raise not_written(Path(directory), error) from error
    finally:
        lock.release()
    log.info("Feature cache written: %s", path)
    sets = load(path, key, splits)
    assert sets is not None, "a cache just written must load"
    return sets, path, False


def claim(
    lock: CacheLock, path: Path, key: str, splits: dict[str, list[tuple[Path, Any]]]
) -> dict[str, FeatureSet] | None:
    """Take `lock` to build `path`, waiting while another run writes it. Returns that run's
    cache if it published one meanwhile (the lock given back); else None, holding the lock,
    with what a dead writer left removed (no other run can be writing then)."""
    if not lock.acquire(blocking=False):
        log.info(
            "Feature cache %s is being written by another run (%s); waiting for it, to reuse it.",
            path, lock.describe(),
        )  # fmt: skip
        lock.acquire()  # until that run ends: the OS frees its lock however it ends
    sets = load(path, key, splits)
    if sets is not None:
        lock.release()
        log.info("Feature cache reused: %s", path)
        return sets
    shutil.rmtree(path, ignore_errors=True)  # unusable (load said why); this run holds the lock
    store.remove_leftovers(path)
    warn_old_caches(path.parent)
    return None


def job_key(job: Extraction) -> str:
    """The cache key of an extraction (see `cache_key`)."""
    transforms = {
        "eval": repr(job.eval_transform),
        "train": repr(job.train_transform) if job.views > 1 else None,
    }
    if job.decode != "pil":  # tensor resizing differs from PIL's in the last bits
        transforms["decode"] = job.decode
    return cache_key(
        job.backbone, job.splits, transforms, job.views, job.dtype, job.seed, job.boundary, job.runtime_name
    )


def warn_old_caches(directory: Path) -> None:
    """Caches of format 3 and before (`<key>.pt`) are never read: say they can go."""
    old = list(directory.glob("*.pt"))
    if old:
        size = sum(path.stat().st_size for path in old)
        log.info(
            "%d feature cache file(s) of an older format (*.pt, %.1f MB) in %s are no longer read; "
            "delete them to free the space.",
            len(old), size / 1e6, directory,
        )  # fmt: skip


def cache_path(directory: str | Path, key: str) -> Path:
    return Path(directory) / key[:32]

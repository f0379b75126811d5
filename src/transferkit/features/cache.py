"""Backbone features computed once and kept on disk, so a frozen backbone costs one forward pass.

The same holds for a frozen prefix of the backbone (the blocks below the lowest one that trains,
see `features.prefix`): its activations at the boundary are cached, and only the top runs each
epoch.

The cache file is named by a key of everything that changes the features: the backbone's (or
the prefix's) weights (a hash of its tensors), the preprocessing and transforms, every image's
path, size and modification time, the number of views, the precision, for augmented views the
seed, and for a prefix the boundary (block and node) and the prefix's code. A file whose key,
format or shapes do not check out is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.data.images import ImageListDataset
from transferkit.data.sampling import epoch_seed
from transferkit.features.precision import frozen_forward

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: augmented views seeded by (seed, view, image)
# Training views in half precision (half the disk and memory; bf16 results are exact in it in
# practice); val and test in fp32, so the logged metrics are the model's own on those images.
# A prefix's training activations computed in fp32 stay fp32: the top trains on them, and fp16
# rounding would lead its weights away from the uncached run's.
STORAGE_DTYPES = {"train": torch.float16, "val": torch.float32, "test": torch.float32}


def storage_dtype(split: str, dtype: torch.dtype, prefix: bool) -> torch.dtype:
    """What `split`'s features (or a prefix's activations), computed in `dtype`, are stored as."""
    if prefix and split == "train" and dtype == torch.float32:
        return torch.float32
    return STORAGE_DTYPES[split]


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

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(key, len(self))
        return self.features[self.view(epoch, index), index].float(), self.labels[index]


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
    eval_dtype: torch.dtype | None = None,
) -> str:
    """The key of a cache; without `boundary` (the whole backbone's features) as it has always
    been, so existing caches stay valid."""
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
        payload.update(boundary=boundary, eval_precision=str(eval_dtype))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load(path: Path, key: str, splits: dict[str, list[tuple[Path, int]]]) -> dict[str, FeatureSet] | None:
    """The cached sets, or None when there is no usable file (missing, corrupt, other format)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["format"] != FORMAT_VERSION or data["key"] != key:
            raise ValueError("format or key differs")
        sets = {}
        for split, items in splits.items():
            features, labels = data["splits"][split]["features"], data["splits"][split]["labels"]
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


def _save(path: Path, key: str, sets: dict[str, FeatureSet]) -> None:
    """Atomically: a crash mid-write leaves no half file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT_VERSION,
        "key": key,
        "splits": {s: {"features": fs.features, "labels": fs.labels} for s, fs in sets.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stored(values: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """`values` as `storage`, or as fp32 where they would overflow it (activations of a
    randomly initialised prefix can exceed fp16's 65504)."""
    if storage.is_floating_point and values.abs().max() > torch.finfo(storage).max:
        storage = torch.float32
    return values.to(storage).cpu().contiguous()


@torch.no_grad()
def extract(
    backbone: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress,
    description: str,
    channels_last: bool = False,
    storage: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, ...) features of the loader's images, in loader order, stored as `storage`."""
    chunks = []
    task = progress.add_task(description, total=len(loader.dataset))
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        chunks.append(_stored(frozen_forward(backbone, images, dtype), storage))
        progress.advance(task, len(images))
    return torch.cat(_widened(chunks))


def _widened(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All in the widest dtype among them (a chunk kept in fp32 by `_stored` widens the rest)."""
    widest = max((t.dtype for t in tensors), key=lambda d: torch.finfo(d).bits)
    return [t.to(widest) for t in tensors]


def build_or_load(
    backbone: nn.Module,
    splits: dict[str, list[tuple[Path, int]]],
    train_transform: Any,
    eval_transform: Any,
    directory: str | Path,
    views: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int | None,
    batch_size: int,
    num_workers: int,
    channels_last: bool = False,
    boundary: dict[str, Any] | None = None,
    eval_dtype: torch.dtype | None = None,
) -> tuple[dict[str, FeatureSet], Path, bool]:
    """The feature sets of every split, from the cache or computed now; returns (sets, path,
    whether it was reused). Train uses `views` augmented passes when views > 1, else the
    deterministic evaluation transform, like val and test. `backbone` is the whole backbone, or
    a prefix of it cut at `boundary` (see `cache_key`); val and test run in `eval_dtype` when
    given, else in `dtype` like train."""
    transforms = {"eval": repr(eval_transform), "train": repr(train_transform) if views > 1 else None}
    key = cache_key(backbone, splits, transforms, views, dtype, seed, boundary, eval_dtype)
    path = cache_path(directory, key)
    sets = load(path, key, splits)
    if sets is not None:
        log.info("Feature cache reused: %s", path)
        return sets, path, True
    original_device = next(backbone.parameters()).device
    modes = {m: m.training for m in backbone.modules()}  # a prefix shares the model's modules
    backbone.eval().to(device)
    sets = {}
    # Cross-validation caches one pool as train and as val: with one view both are the
    # evaluation transform's features of the same images, computed once (stored as each split is).
    same = views == 1 and splits.get("train") == splits.get("val") and eval_dtype in (None, dtype)
    computed: torch.Tensor | None = None
    try:
        with Progress(transient=False) as progress:
            for split, items in splits.items():
                storage = storage_dtype(split, dtype, boundary is not None)
                if same and split == "val" and computed is not None:
                    sets[split] = FeatureSet(_stored(computed, storage), label_tensor(items))
                    continue
                passes = views if split == "train" and views > 1 else 1
                dataset = ImageListDataset(items, train_transform, seed) if passes > 1 else None
                features = torch.stack(
                    _widened(
                        [
                            extract(
                                backbone,
                                DataLoader(
                                    dataset or ImageListDataset(items, eval_transform),
                                    batch_size=batch_size,
                                    # view v of image i is augmented as key v * N + i: seeded by
                                    # (seed, v, i), so a rebuild under the same key is the same
                                    sampler=range(v * len(items), (v + 1) * len(items)) if dataset else None,
                                    num_workers=num_workers,
                                    pin_memory=device.type == "cuda",
                                ),
                                device,
                                dtype if split == "train" or eval_dtype is None else eval_dtype,
                                progress,
                                f"Caching {split} {'activations' if boundary else 'features'}"
                                + (f" (view {v + 1}/{passes})" if passes > 1 else ""),
                                channels_last,
                                torch.float32 if same else storage,
                            )
                            for v in range(passes)
                        ]
                    )
                )
                if same:
                    computed, features = features, _stored(features, storage)
                sets[split] = FeatureSet(features, label_tensor(items))
    finally:
        backbone.to(original_device)
        for module, mode in modes.items():
            module.training = mode
    _save(path, key, sets)
    log.info("Feature cache written: %s", path)
    return sets, path, False


def cache_path(directory: str | Path, key: str) -> Path:
    return Path(directory) / f"{key[:32]}.pt"

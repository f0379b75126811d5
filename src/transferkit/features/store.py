"""The feature cache on disk: one directory per key, each split's features and labels as `.npy`
files beside a `meta.json`, opened memory-mapped.

`.npy` rather than safetensors: numpy's memmap opens a file of any size in constant time and
hands out rows by slicing, without reading the rest; every process that opens it shares the
operating system's page cache, so DDP ranks hold no copy each; and a half-written file is
detected by its header's shape against its size. safetensors maps too, but its `get_tensor`
reads a tensor whole into memory.

A directory is built under a temporary name in the same parent (each rank writing its shards,
`Shard`), every file flushed and fsynced, `meta.json` written last, and only then renamed to
its key: a crash, a full disk or a concurrent writer leaves a `*.tmp-*` directory that no
run reads, never a cache that loads. A build directory is its builder's (named with its host and
pid): only the holder of the cache's lock (`features.lock`) makes one, and it removes those of
dead holders before making its own, never while another run could hold the lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 5  # 5: fp32 results stored as fp32; 4: a directory of .npy files; 3: one torch.save file
META = "meta.json"


def features_file(directory: Path, split: str, rank: int | None = None) -> Path:
    """A split's features: the whole (views, N, ...) array, or rank `rank`'s shard of it."""
    return directory / (f"{split}.features.npy" if rank is None else f"{split}.rank{rank}.npy")


def labels_file(directory: Path, split: str) -> Path:
    return directory / f"{split}.labels.npy"


def temporary_dir(final: Path) -> Path:
    """A fresh name beside `final` for building it (same filesystem: the rename is atomic), its
    builder's own: `<final>.tmp-<host>-<pid>-<random>`."""
    return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def build_dirs(final: Path) -> list[Path]:
    """`final`'s build directories, newest first (while its lock is held: the holder's)."""
    found = []
    for build in final.parent.glob(f"{final.name}.tmp-*"):
        try:
            found.append((build.stat().st_mtime, build))
        except OSError:  # removed meanwhile
            continue
    return [build for _, build in sorted(found, reverse=True)]


def builder(build: Path) -> str:
    """Who makes a build directory, from its name (see `temporary_dir`): "pid 4242 on node3"."""
    parts = build.name.partition(".tmp-")[2].rsplit("-", 2)
    return f"pid {parts[1]} on {parts[0]}" if len(parts) == 3 else f"the writer of {build.name}"


def fsync(path: Path) -> None:
    """Flush `path` (a file or a directory) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reserve(path: Path) -> None:
    """Allocate `path`'s blocks now, so a full disk fails here with ENOSPC instead of killing
    the process (SIGBUS) when a page of the memory map is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot
            raise
    finally:
        os.close(fd)


class Shard:
    """A (views, rows, ...) array of features written batch by batch into a `.npy` memmap, made
    on the first batch (its shape and dtype known then) and widened to fp32 should a later
    batch need it (values past fp16's range)."""

    def __init__(self, path: Path, views: int, rows: int) -> None:
        self.path, self.views, self.rows = path, views, rows
        self.array: np.memmap | None = None

    def write(self, view: int, start: int, values: torch.Tensor) -> None:
        data = values.numpy()
        if self.array is None:
            self.array = self._create(self.path, data.shape[1:], data.dtype)
        elif data.dtype.itemsize > self.array.dtype.itemsize:
            self._widen(data.dtype)
        self.array[view, start : start + len(data)] = data

    def _create(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(self.views, self.rows, *shape))
        reserve(path)
        return array

    def _widen(self, dtype: np.dtype) -> None:
        wide_path = self.path.with_suffix(".wide.npy")
        wide = self._create(wide_path, self.array.shape[2:], dtype)
        for view in range(self.views):
            wide[view] = self.array[view]
        del self.array
        os.replace(wide_path, self.path)
        self.array = wide

    def close(self) -> None:
        """Flush and fsync the file (a shard that got no rows has none)."""
        if self.array is not None:
            self.array.flush()
            del self.array
            self.array = None
            fsync(self.path)


def open_array(path: Path) -> np.ndarray:
    """`path` memory-mapped copy-on-write: pages shared with every process, and writable as
    torch.from_numpy wants, though nothing writes."""
    return np.load(path, mmap_mode="c")


def write_labels(directory: Path, split: str, labels: torch.Tensor) -> None:
    path = labels_file(directory, split)
    with open(path, "wb") as f:
        np.save(f, labels.numpy())
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path, key: str, splits: list[str]) -> None:
    """Write `meta.json` (last: a directory without it is incomplete), then rename `tmp` to
    `final` (only the lock's holder publishes)."""
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "key": key, "splits": {}}
    for split in splits:
        features = open_array(features_file(tmp, split))
        meta["splits"][split] = {"shape": list(features.shape), "dtype": str(features.dtype)}
        del features
    with open(tmp / META, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    fsync(tmp)
    os.rename(tmp, final)  # only the lock's holder publishes: nobody got there first
    fsync(final.parent)


def read_meta(directory: Path, key: str) -> dict[str, Any] | None:
    """The directory's metadata when it is a complete cache of this format and key."""
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        return None
    return meta


def open_split(directory: Path, split: str, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of `split`: features memory-mapped, checked against the metadata
    (a truncated file fails here: numpy maps no more than the file holds)."""
    features = open_array(features_file(directory, split))
    expected = meta["splits"][split]
    if list(features.shape) != expected["shape"] or str(features.dtype) != expected["dtype"]:
        raise ValueError(f"{split} features are {features.dtype}{list(features.shape)}, not as written")
    labels = np.load(labels_file(directory, split))
    return torch.from_numpy(features), torch.from_numpy(labels)


def remove_leftovers(final: Path) -> None:
    """Build directories of `final` left by dead writers. Only the lock's holder may call it:
    every other build directory is then a dead process's (its lock was freed when it died)."""
    for leftover in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)

"""Where extraction decodes its images: PIL in the CPU loader workers (the default), or
torchvision's `decode_jpeg` on the GPU (nvJPEG), batched, with the evaluation transform run on
the decoded tensors there.

The GPU is chosen (`choose_decode`) only when it pays: extraction on CUDA, every image a JPEG,
and the GPU measured faster at decode + transform than all the loader workers together
(`decode_rates` times a few files each way). Tensor resizing is not PIL's to the last bit, so
the choice is part of the cache key. Augmented views always decode on the CPU: their random
transforms are seeded per image in the workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from transferkit.data.images import load_rgb

JPEG_SUFFIXES = (".jpg", ".jpeg")
SAMPLE = 32  # files timed each way


def all_jpeg(paths: Sequence[Path]) -> bool:
    return bool(paths) and all(Path(p).suffix.lower() in JPEG_SUFFIXES for p in paths)


def decode_device(
    device: torch.device,
    paths: Sequence[Path],
    workers: int,
    cpu_per_worker: float | None,
    gpu: float | None,
) -> str:
    """ "pil" (CPU workers) or the GPU's name: the GPU only on CUDA, for JPEGs only, and only
    when its rate (images/s) beats `cpu_per_worker` times the workers; unknown rates: "pil"."""
    if device.type != "cuda" or not all_jpeg(paths) or cpu_per_worker is None or gpu is None:
        return "pil"
    return str(device) if gpu > cpu_per_worker * max(1, workers) else "pil"


class EncodedImages(Dataset):
    """(the file's bytes as a uint8 tensor, label) for a key `epoch * n + index`: what the
    workers hand over when the GPU decodes."""

    def __init__(self, items: Sequence[tuple[Path, Any]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, Any]:
        path, label = self.items[key % len(self.items)]
        return read_file(str(path)), label


def encoded_batch(samples: list[tuple[torch.Tensor, Any]]) -> tuple[list[torch.Tensor], list[Any]]:
    """The loader's collate: the files' bytes stay a list (each its own length)."""
    data, labels = zip(*samples, strict=True)
    return list(data), list(labels)


def decode_batch(
    data: list[torch.Tensor], transform: Callable[[Any], torch.Tensor], device: str
) -> torch.Tensor:
    """Decode a batch of JPEG files on `device` and run `transform` on each image there."""
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return torch.stack([transform(image) for image in images])


def decode_rates(
    paths: Sequence[Path], transform: Callable[[Any], torch.Tensor], device: torch.device
) -> tuple[float, float]:
    """(images/s of one CPU worker with PIL, images/s of `device` with decode_jpeg), each with
    the evaluation transform, timed on up to SAMPLE files after one warm-up batch."""
    sample = list(paths[:SAMPLE])
    started = time.perf_counter()
    for path in sample:
        transform(load_rgb(path))
    cpu = len(sample) / (time.perf_counter() - started)
    data = [read_file(str(path)) for path in sample]
    decode_batch(data[:2], transform, str(device))  # warm-up: nvJPEG's handles, kernels
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    decode_batch(data, transform, str(device))
    torch.cuda.synchronize(device)
    return cpu, len(sample) / (time.perf_counter() - started)


def choose_decode(
    device: torch.device, paths: Sequence[Path], workers: int, transform: Callable[[Any], torch.Tensor]
) -> str:
    """`decode_device` with rates measured here, when the GPU could be chosen at all."""
    if device.type != "cuda" or not all_jpeg(paths):
        return "pil"
    cpu, gpu = decode_rates(paths, transform, device)
    return decode_device(device, paths, workers, cpu, gpu)

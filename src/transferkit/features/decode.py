"""Where extraction decodes its images: PIL in the CPU loader workers (the default), or
torchvision's `decode_jpeg` on the GPU (nvJPEG), batched, with the evaluation transform run on
the decoded tensors there.

The GPU is chosen (`choose_decode`) only when it pays: extraction on CUDA, every image a JPEG,
and the GPU measured faster at decode + transform than all the loader workers together
(`decode_rates` times a few files each way). Tensor resizing is not PIL's to the last bit, so
the choice is part of the cache key. Augmented views always decode on the CPU: their random
transforms are seeded per image in the workers.

Photos are turned upright as on the PIL path (`ImageOps.exif_transpose` in `load_rgb`, which
evaluation, predict and serve use): nvJPEG ignores EXIF, and decode_jpeg's
`apply_exif_orientation` works on the CPU only, so the workers read each file's orientation
with PIL (its header only, as exif_transpose reads it) and the decoded tensor is flipped or
turned to match.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import ExifTags, Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

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


class Encoded(NamedTuple):
    """A JPEG file's bytes (a uint8 tensor) and its EXIF orientation (1: upright)."""

    data: torch.Tensor
    orientation: int


def exif_orientation(raw: bytes) -> int:
    """The orientation exif_transpose would apply (EXIF tag 0x0112, or XMP's, as Pillow's
    getexif reads them), from the header alone; 1 when there is none or it cannot be read (the
    decode then says what is wrong with the file)."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        return 1


def encode(path: Path) -> Encoded:
    """A file as the GPU decode takes it: its bytes, and its orientation read here (in a worker)."""
    raw = Path(path).read_bytes()
    return Encoded(torch.frombuffer(bytearray(raw), dtype=torch.uint8), exif_orientation(raw))


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded (C, H, W) image turned as exif_transpose turns the PIL image: orientation 2 is
    mirrored, 3 upside down, 6 turned 90 degrees clockwise to be upright, ...; 1 and unknown
    values are left alone, as there."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


class EncodedImages(Dataset):
    """(`Encoded` file, label) for a key `epoch * n + index`: what the workers hand over when
    the GPU decodes."""

    def __init__(self, items: Sequence[tuple[Path, Any]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int) -> tuple[Encoded, Any]:
        path, label = self.items[key % len(self.items)]
        return encode(path), label


def encoded_batch(samples: list[tuple[Encoded, Any]]) -> tuple[list[Encoded], list[Any]]:
    """The loader's collate: the files stay a list (each its own length)."""
    files, labels = zip(*samples, strict=True)
    return list(files), list(labels)


def decode_batch(files: list[Encoded], transform: Callable[[Any], torch.Tensor], device: str) -> torch.Tensor:
    """Decode a batch of JPEG files on `device`, turn each upright as its EXIF says (as the PIL
    path does), and run `transform` on each image there."""
    images = decode_jpeg([file.data for file in files], mode=ImageReadMode.RGB, device=device)
    return torch.stack(
        [transform(upright(image, file.orientation)) for image, file in zip(images, files, strict=True)]
    )


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
    data = [encode(path) for path in sample]
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

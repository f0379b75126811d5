"""Reading any image file as an RGB picture, and a dataset over a list of files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from transferkit.data.sampling import epoch_seed
from transferkit.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)
_WIDE_MODES = ("I", "F")  # 16/32-bit integer and float single-channel images


def is_image_file(path: Path) -> bool:
    """By extension, whatever its case; hidden files (.DS_Store, ._foo.jpg) are never images."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency over white, wide grey scaled to 8 bits."""
    if image.mode.startswith(_WIDE_MODES):
        pixels = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
            pixels = pixels / 257.0  # the 16-bit range onto 8 bits, the same for every image
        elif image.mode == "F" and pixels.max(initial=0) <= 1.0:
            pixels = pixels * 255.0
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode a file fully (so truncation shows here), honour EXIF rotation, return RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"Cannot read image {path} ({error}); remove or replace the file.") from error


class ImageListDataset(Dataset):
    """(image, label) pairs over a fixed list of files.

    With a `seed`, a key `epoch * n + index` (what EpochSampler yields) augments sample `index`
    with random draws seeded by (seed, epoch, index): the same in any worker, in any order, and
    after a resume, and the global RNG is left as it was.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable[[Image.Image], Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int) -> tuple[Any, int]:
        epoch, index = divmod(key, len(self.samples))
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is None:
            return image, label
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, epoch, index))
            return self.transform(image), label

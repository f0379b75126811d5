"""Reading any image file as an RGB picture, and a dataset over a list of files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from transferkit.data.sampling import epoch_seed
from transferkit.errors import DataError

if TYPE_CHECKING:
    from transferkit.data.samples import Label, Sample

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)
_WIDE_MODES = ("I", "F")  # I, I;16, I;16B... (integer) and F (float): single-channel samples
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT, _TIFF_SIGNED = 258, 339, 2


def is_image_file(path: Path) -> bool:
    """By extension, whatever its case; hidden files (.DS_Store, ._foo.jpg) are never images."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _first(value: Any, default: int) -> int:
    """A TIFF tag's value, one number or one per channel (the same for a grey image)."""
    if isinstance(value, tuple):
        value = value[0] if value else default
    return default if value is None else int(value)


def white_level(image: Image.Image) -> float | None:
    """The sample value that is white in a wide grey image, from its file format, never its pixels:
    the same sample must give the same grey in every picture, however dark or bright the rest is.

    A TIFF says it in its tags (BitsPerSample, SampleFormat): a 12-bit TIFF opens as I;16 holding
    0..4095, a 32-bit one as I; signed samples keep 0 as black, so their white is the top of the
    positive range and negatives clip to black. Every other integer grey Pillow opens holds 16-bit
    samples: PNG, and PGM/PPM, whose maxval Pillow rescales to 65535. Float samples (mode F) have no
    bit depth at all, so they follow the usual convention of [0, 1] (scikit-image, OpenCV, torchvision
    floats): 1.0 is white, whatever else the picture holds. None for the 8-bit modes.
    """
    if image.mode == "F":
        return 1.0
    if not image.mode.startswith("I"):
        return None
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None:
        bits = _first(tags.get(_TIFF_BITS_PER_SAMPLE), 16)
        signed = _first(tags.get(_TIFF_SAMPLE_FORMAT), 1) == _TIFF_SIGNED
        return float(2 ** (bits - signed) - 1)
    return 65535.0


def _wide_to_rgb(image: Image.Image, white: float) -> Image.Image:
    """Samples 0..white onto 0..255, rounded to the nearest level; outside that range (negative,
    or floats above 1) clips, and NaN is black."""
    samples = np.asarray(image)
    if white > np.iinfo(np.int32).max:  # unsigned 32-bit: Pillow's mode I holds them as int32
        samples = samples.view(np.uint32)
    pixels = samples.astype(np.float64) * 255.0 / white  # multiply first: 200 * 257 is 200.0
    levels = np.floor(np.nan_to_num(pixels, nan=0.0) + 0.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(levels, mode="L").convert("RGB")


def to_rgb(image: Image.Image, white: float | None = None) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency over white, wide grey scaled from 0..`white`
    (by default `white_level(image)`; pass it when `image` is a copy that lost its file's tags)."""
    if image.mode.startswith(_WIDE_MODES):
        return _wide_to_rgb(image, white if white is not None else white_level(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_opened(image: Image.Image) -> Image.Image:
    """An opened image decoded in full (so truncation shows here), EXIF rotation honoured, as RGB:
    what every path that reads images (training, eval, predict, serve) makes of one."""
    image.load()
    white = white_level(image)  # before the transpose, whose copy has no TIFF tags
    return to_rgb(ImageOps.exif_transpose(image), white)


def decode_rgb(file: str | Path | BinaryIO, name: str | Path) -> Image.Image:
    """Decode an image (`decode_opened`). `file` is a path or the file's bytes (the scan reads
    them itself); `name` is for the error."""
    try:
        with Image.open(file) as image:
            return decode_opened(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"Cannot read image {name} ({error}); remove or replace the file.") from error


def load_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as RGB, decoded in full; DataError naming the file when it cannot be."""
    return decode_rgb(path, path)


def target(label: Label) -> int | torch.Tensor:
    """What a sample's label becomes in a batch: a class index, or with multi-label data a float
    0/1 vector (one per class) that collates to the (B, C) targets BCEWithLogitsLoss takes."""
    return torch.tensor(label, dtype=torch.float32) if isinstance(label, tuple) else label


class ImageListDataset(Dataset):
    """(image, target) pairs over a fixed list of files (see `target`).

    With a `seed`, a key `epoch * n + index` (what EpochSampler yields) augments sample `index`
    with random draws seeded by (seed, epoch, index): the same in any worker, in any order, and
    after a resume, and the global RNG is left as it was.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int) -> tuple[Any, int | torch.Tensor]:
        epoch, index = divmod(key, len(self.samples))
        path, sample_label = self.samples[index]
        image, label = load_rgb(path), target(sample_label)
        if self.transform is None:
            return image, label
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, epoch, index))
            return self.transform(image), label

"""The demo dataset: procedurally drawn shapes, generated once so `python train.py` needs no download."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.errors import DataError

SHAPES = ("circle", "square", "triangle", "star", "cross")
_VERSION = 1
_MARKER = ".complete.json"

log = logging.getLogger(__name__)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(angle + math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        corners = [(angle + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "star":
        corners = [(angle + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    else:  # cross: a plus sign of arm width r/3
        w = r / 3
        pts = [
            (w, r),
            (w, w),
            (r, w),
            (r, -w),
            (w, -w),
            (w, -r),
            (-w, -r),
            (-w, -w),
            (-r, -w),
            (-r, w),
            (-w, w),
            (-w, r),
        ]
        corners = [(math.atan2(y, x) + angle, math.hypot(x, y)) for x, y in pts]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for a, d in corners]


def _background(rng: random.Random, size: int) -> Image.Image:
    """A random colour, a two-colour gradient, or stripes: textures that carry no class signal."""
    base = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    kind = rng.randrange(3)
    other = tuple(rng.randrange(256) for _ in range(3))
    if kind == 1:
        for y in range(size):
            t = y / (size - 1)
            draw.line(
                [(0, y), (size, y)],
                fill=tuple(round(a + (b - a) * t) for a, b in zip(base, other, strict=True)),
            )
    elif kind == 2:
        step = rng.randint(6, 16)
        for x in range(-size, 2 * size, step):
            draw.line([(x, 0), (x + size, size)], fill=other, width=max(1, step // 3))
    return image


def draw_shape(shape: str, seed: int, size: int = 96) -> Image.Image:
    """One picture of `shape` with random colour, size, position, rotation and background."""
    rng = random.Random(seed)
    image = _background(rng, size)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(rng.randrange(256) for _ in range(3))
    outline = tuple(255 - c for c in colour)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline, width=2)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=colour, outline=outline)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def draw_shapes(shapes: Sequence[str], seed: int, size: int = 96) -> Image.Image:
    """One picture holding each of `shapes` (none: the background alone), each in its own
    quarter of the frame, with random colour, size, rotation and background: several labels at once."""
    rng = random.Random(seed)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    half = size / 2
    for shape, quarter in zip(shapes, rng.sample(range(4), len(shapes)), strict=False):
        r = rng.uniform(0.3, 0.45) * half
        cx = (quarter % 2) * half + rng.uniform(r, half - r)
        cy = (quarter // 2) * half + rng.uniform(r, half - r)
        colour = tuple(rng.randrange(256) for _ in range(3))
        outline = tuple(255 - c for c in colour)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline, width=2)
        else:
            corners = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw.polygon(corners, fill=colour, outline=outline)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))


def _manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, counts: dict[str, int]) -> bool:
    """The marker matches and every file it promises is there."""
    expected = len(SHAPES) * (counts["train"] + counts["val"])
    return (
        _manifest(root) == {"version": _VERSION, "counts": counts}
        and len(list(root.rglob("*.jpg"))) == expected
    )


def generate_demo(
    root: str | Path, train_per_class: int = 100, val_per_class: int = 25, size: int = 96
) -> Path:
    """Write the demo set under `root` unless a complete copy is there; deterministic.

    A folder is only ever replaced if it is an earlier demo set (it holds the demo's marker) or
    empty: a user's own data passed by mistake is refused, never deleted.
    """
    root = Path(root)
    counts = {"train": train_per_class, "val": val_per_class, "size": size}
    if _is_complete(root, counts):
        return root
    if root.exists() and _manifest(root) is None and any(root.iterdir()):
        raise DataError(
            f"{root} is not the generated demo set, and data=demo would replace it. "
            f"To train on it, use data=imagefolder data.root={root}."
        )
    log.info(
        "Generating the demo data in %s (%d shapes, %d train + %d val images each): once, reused after.",
        root,
        len(SHAPES),
        train_per_class,
        val_per_class,
    )
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, shape in enumerate(SHAPES):
            folder = staging / split / shape
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed = label * 1_000_003 + 2 * i + (split == "val")  # train and val never share a seed
                draw_shape(shape, seed, size).save(folder / f"{shape}_{i:04d}.jpg", quality=92)
    (staging / _MARKER).write_text(json.dumps({"version": _VERSION, "counts": counts}))
    if _is_complete(root, counts):  # another process (a DDP rank) finished first
        shutil.rmtree(staging)
        return root
    shutil.rmtree(root, ignore_errors=True)  # an earlier demo set of other counts, or damaged
    try:
        staging.rename(root)
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(staging, ignore_errors=True)
    return root


class DemoDataModule(ImageFolderDataModule):
    """The image-folder module over the generated demo set (created in `prepare_data`)."""

    def __init__(
        self, root: str | Path, train_per_class: int = 100, val_per_class: int = 25, **kwargs
    ) -> None:
        super().__init__(root, **kwargs)
        self.train_per_class = train_per_class
        self.val_per_class = val_per_class

    def prepare_data(self) -> None:
        generate_demo(self.root, self.train_per_class, self.val_per_class)

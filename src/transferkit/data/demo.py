"""The demo dataset: procedurally drawn shapes, generated once so `python train.py` needs no download."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from transferkit.data.datamodule import ImageFolderDataModule

SHAPES = ("circle", "square", "triangle", "star", "cross")
_VERSION = 1


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


def _is_complete(root: Path, counts: dict[str, int]) -> bool:
    marker = root / ".complete.json"
    try:
        return json.loads(marker.read_text()) == {"version": _VERSION, "counts": counts}
    except (OSError, ValueError):
        return False


def generate_demo(
    root: str | Path, train_per_class: int = 100, val_per_class: int = 25, size: int = 96
) -> Path:
    """Write the demo set under `root` unless a complete copy is there; deterministic."""
    root = Path(root)
    counts = {"train": train_per_class, "val": val_per_class, "size": size}
    if _is_complete(root, counts):
        return root
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, shape in enumerate(SHAPES):
            folder = staging / split / shape
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed = label * 1_000_003 + 2 * i + (split == "val")  # train and val never share a seed
                draw_shape(shape, seed, size).save(folder / f"{shape}_{i:04d}.jpg", quality=92)
    (staging / ".complete.json").write_text(json.dumps({"version": _VERSION, "counts": counts}))
    shutil.rmtree(root, ignore_errors=True)  # an incomplete earlier attempt
    try:
        staging.rename(root)
    except OSError:  # another process (a DDP rank) finished first
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

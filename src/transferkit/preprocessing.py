"""What a backbone expects of its input, and the transforms that produce it.

Preprocessing travels with the model (it is stored in every checkpoint), so evaluation,
prediction and export reproduce it without the training config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Input size, resize before the centre crop, normalisation and interpolation."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def crop_pct(self) -> float:
        return self.image_size / self.resize_size

    def with_overrides(
        self,
        image_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
    ) -> Preprocessing:
        """Apply the data config's overrides; a new size keeps the weights' crop ratio."""
        new = self
        if image_size is not None and resize_size is None:
            resize_size = round(image_size / self.crop_pct)
        if image_size is not None:
            new = replace(new, image_size=int(image_size))
        if resize_size is not None:
            new = replace(new, resize_size=int(resize_size))
        if mean is not None:
            new = replace(new, mean=tuple(float(m) for m in mean))
        if std is not None:
            new = replace(new, std=tuple(float(s) for s in std))
        if interpolation is not None:
            new = replace(new, interpolation=str(interpolation))
        return new

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def transforms(self, train: bool = False, augment: bool = True) -> T.Compose:
        """Training: RandomResizedCrop + flip (or the eval path when augment is off).
        Evaluation: Resize + CenterCrop, as the backbone's weights were evaluated."""
        interpolation = InterpolationMode(self.interpolation)
        if train and augment:
            geometry = [
                T.RandomResizedCrop(self.image_size, interpolation=interpolation, antialias=True),
                T.RandomHorizontalFlip(),
            ]
        else:
            geometry = [
                T.Resize(self.resize_size, interpolation=interpolation, antialias=True),
                T.CenterCrop(self.image_size),
            ]
        return T.Compose(
            [
                *geometry,  # on the PIL image: Pillow's resize is the fastest here
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )

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

from transferkit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_POLICIES = ("basic", "trivial", "randaugment")


def augment_policy(augment: str | bool | None) -> str | None:
    """The training augmentation named by `data.augment`, or None for none.

    Hydra reads `data.augment=true` / `false` as booleans, so true means basic and false (or
    null) means off.
    """
    if augment is None or augment is False:
        return None
    if augment is True:
        return "basic"
    if isinstance(augment, str) and augment in AUGMENT_POLICIES:
        return augment
    raise ConfigError(
        f"data.augment={augment!r} is not a policy; use one of {', '.join(AUGMENT_POLICIES)} "
        f"or false (the evaluation transform)."
    )


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

    def transforms(self, train: bool = False, augment: str | bool | None = "basic") -> T.Compose:
        """Evaluation: Resize + CenterCrop, as the backbone's weights were evaluated.

        Training follows `augment_policy(augment)`: basic is RandomResizedCrop + flip; trivial and
        randaugment add TrivialAugmentWide / RandAugment after them; off is the evaluation path.
        """
        interpolation = InterpolationMode(self.interpolation)
        policy = augment_policy(augment) if train else None
        if policy is None:
            on_pil: list[Any] = [
                T.Resize(self.resize_size, interpolation=interpolation, antialias=True),
                T.CenterCrop(self.image_size),
            ]
        else:
            on_pil = [
                T.RandomResizedCrop(self.image_size, interpolation=interpolation, antialias=True),
                T.RandomHorizontalFlip(),
            ]
        if policy == "trivial":
            on_pil.append(T.TrivialAugmentWide(interpolation=interpolation))
        elif policy == "randaugment":
            on_pil.append(T.RandAugment(interpolation=interpolation))
        return T.Compose(
            [
                *on_pil,  # Pillow resizes fastest, so crops and policies run before ToImage
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )

"""What a backbone expects of its input, and the transforms that produce it.

Preprocessing travels with the model (it is stored in every checkpoint), so evaluation,
prediction and export reproduce it without the training config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from transferkit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_POLICIES = ("basic", "trivial", "randaugment")
CROP_MODES = ("center", "squash", "border")
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default


def crop_scale_range(crop_scale: Sequence[float]) -> tuple[float, float]:
    """`data.crop_scale` checked: the smallest and largest share of the image's area that the
    training crop keeps (torchvision's and timm's `scale`)."""
    values = tuple(float(v) for v in crop_scale)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise ConfigError(
            f"data.crop_scale={list(crop_scale)} must be [min, max] with 0 < min <= max <= 1: the share "
            f"of the image's area a random training crop keeps (torchvision's default: [0.08, 1.0])."
        )
    return values[0], values[1]


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
class ResizeLongest:
    """Resize so the longer side is `size`, keeping the aspect ratio, rounded as timm's
    ResizeKeepRatio(longest=1) rounds (torchvision's max_size truncates, a pixel off).
    A dataclass, so its repr (part of the feature cache's key) is stable."""

    size: int
    interpolation: InterpolationMode

    def __call__(self, image: Any) -> Any:
        height, width = F.get_size(image)
        ratio = max(height, width) / self.size
        size = [round(height / ratio), round(width / ratio)]
        return F.resize(image, size, interpolation=self.interpolation, antialias=True)


@dataclass(frozen=True)
class CenterCropOrPad:
    """Centre-crop to a square, first padding a side that is too short with `fill` (timm pads
    with the mean colour, so the pad normalises to zero; torchvision's CenterCrop pads black)."""

    size: int
    fill: tuple[int, ...]

    def __call__(self, image: Any) -> Any:
        height, width = F.get_size(image)
        pad_w, pad_h = max(self.size - width, 0), max(self.size - height, 0)
        if pad_w or pad_h:
            padding = [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2]
            image = F.pad(image, padding, fill=list(self.fill))
        return F.center_crop(image, [self.size, self.size])


@dataclass(frozen=True)
class Preprocessing:
    """Input size, resize before the crop, normalisation, interpolation, and how evaluation fits
    an image to the square (`crop_mode`, as timm's pretrained configs name it):

    - center: the short side to `resize_size`, then a centre crop (the aspect kept, edges lost);
    - squash: both sides to `resize_size`, then a centre crop (nothing lost at crop_pct 1, the
      aspect not kept);
    - border: the long side to `resize_size`, then a centre crop that pads the short side with
      the mean colour (the aspect kept, nothing lost at crop_pct 1).

    Saved preprocessing from before crop_mode existed loads as center, what it was then.
    """

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(
                f"Preprocessing crop_mode={self.crop_mode!r} is not a crop mode; use one of: "
                f"{', '.join(CROP_MODES)}."
            )

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
        crop_mode: str | None = None,
        crop_pct: float | None = None,
    ) -> Preprocessing:
        """Apply the data config's overrides; a new size keeps the weights' crop ratio unless
        `crop_pct` (the share of the resized image the evaluation crop keeps) says otherwise."""
        new = self
        if crop_pct is not None and resize_size is None:
            resize_size = round((self.image_size if image_size is None else int(image_size)) / crop_pct)
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
        if crop_mode is not None:
            new = replace(new, crop_mode=str(crop_mode))
        return new

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def _fit(self, interpolation: InterpolationMode) -> list[Any]:
        """The evaluation resize and crop, step for step timm's `transforms_imagenet_eval`."""
        if self.crop_mode == "squash":
            square = (self.resize_size, self.resize_size)
            return [
                T.Resize(square, interpolation=interpolation, antialias=True),
                T.CenterCrop(self.image_size),
            ]
        if self.crop_mode == "border":
            fill = tuple(round(255 * m) for m in self.mean)
            return [ResizeLongest(self.resize_size, interpolation), CenterCropOrPad(self.image_size, fill)]
        return [
            T.Resize(self.resize_size, interpolation=interpolation, antialias=True),
            T.CenterCrop(self.image_size),
        ]

    def transforms(
        self,
        train: bool = False,
        augment: str | bool | None = "basic",
        crop_scale: tuple[float, float] = CROP_SCALE,
    ) -> T.Compose:
        """Evaluation: resize and crop as `crop_mode` says, as the backbone's weights were
        evaluated.

        Training follows `augment_policy(augment)`: basic is RandomResizedCrop (keeping
        `crop_scale` of the image's area) + flip; trivial and randaugment add TrivialAugmentWide /
        RandAugment after them; off is the evaluation path.
        """
        interpolation = InterpolationMode(self.interpolation)
        policy = augment_policy(augment) if train else None
        if policy is None:
            on_pil = self._fit(interpolation)
        else:
            on_pil = [
                T.RandomResizedCrop(
                    self.image_size, scale=tuple(crop_scale), interpolation=interpolation, antialias=True
                ),
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

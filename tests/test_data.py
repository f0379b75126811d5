"""The data module: classes, splits, image modes, transforms, the demo set and data errors."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from hydra.utils import instantiate
from PIL import Image
from torchvision.transforms import v2 as T

from transferkit.backbones.preprocessing import Preprocessing
from transferkit.data import DemoDataModule, ImageFolderDataModule
from transferkit.data.demo import SHAPES, generate_demo
from transferkit.data.folders import find_splits
from transferkit.data.images import ImageListDataset, load_rgb
from transferkit.data.sampling import EpochSampler
from transferkit.data.splitting import numbering
from transferkit.errors import ConfigError, DataError

TO_TENSOR = [T.ToImage, T.ToDtype, T.Normalize]
EVAL_TYPES = [T.Resize, T.CenterCrop, *TO_TENSOR]
BASIC_TYPES = [T.RandomResizedCrop, T.RandomHorizontalFlip]


def test_classes_come_from_train_and_every_split_is_labelled(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=("b_cls", "a_cls"), splits={"train": 5, "val": 2, "test": 3})
    splits = find_splits(root)
    assert splits.class_names == ["a_cls", "b_cls"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 6)
    assert not splits.val_from_train
    assert all(path.parent.name == splits.class_names[label] for path, label in splits.val + splits.test)


def test_no_val_folder_gives_a_seeded_split_of_each_class_file_by_file(tmp_path: Path) -> None:
    """Each file is in val when its number (the hash of its path under the root and the seed)
    is below val_fraction: about that share of every class, not exactly (see test_splits.py)."""
    root = make_image_folder(tmp_path, classes=("a", "b", "c"), splits={"train": 20})
    first = find_splits(root, val_fraction=0.25, seed=1)
    assert first.val_from_train
    number = numbering(root, seed=1)
    assert all(number(path) < 0.25 for path, _ in first.val)
    assert all(number(path) >= 0.25 for path, _ in first.train)
    assert all(1 <= n <= 10 for n in Counter(label for _, label in first.val).values())
    assert len(Counter(label for _, label in first.val)) == 3 and len(first.train) + len(first.val) == 60
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}
    assert find_splits(root, val_fraction=0.25, seed=1).val == first.val
    assert find_splits(root, val_fraction=0.25, seed=2).val != first.val


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_outside_open_unit_interval_is_refused(tmp_path: Path, fraction: float) -> None:
    root = make_image_folder(tmp_path, splits={"train": 4})
    with pytest.raises(ConfigError, match="val_fraction"):
        find_splits(root, val_fraction=fraction)


def test_extensions_case_insensitive_and_junk_ignored(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=("a", "b"), splits={"train": 2})
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "UPPER.JPG", format="JPEG")
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "mixed.JpEg", format="JPEG")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0junk")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "__MACOSX").mkdir()
    (root / "train" / ".hidden_class").mkdir()
    splits = find_splits(root)
    assert splits.class_names == ["a", "b"]
    names = {p.name for p, label in splits.train + splits.val if label == 0}
    assert names == {"000.png", "001.png", "UPPER.JPG", "mixed.JpEg"}


def row(mode: str, values: list, palette: list[int] | None = None) -> Image.Image:
    """A one-row image of `mode` holding `values`, one per pixel."""
    image = Image.new(mode, (len(values), 1))
    if palette is not None:
        image.putpalette(palette)
    image.putdata(values)
    return image


def saved(image: Image.Image, name: str, **options) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        image.save(folder / name, **options)
        return folder / name

    return write


def netpbm(magic: str, maxval: int, values: list[int], name: str) -> Callable[[Path], Path]:
    """A binary PGM (P5) or PPM (P6), one row; samples of two bytes, big-endian, above maxval 255."""
    width = len(values) // (3 if magic == "P6" else 1)
    data = np.array(values, dtype=">u2" if maxval > 255 else "u1").tobytes()

    def write(folder: Path) -> Path:
        (folder / name).write_bytes(f"{magic}\n{width} 1\n{maxval}\n".encode() + data)
        return folder / name

    return write


def grey_tiff(
    values: list[int], bits: int, signed: bool = False, orientation: int = 1
) -> Callable[[Path], Path]:
    """A one-row little-endian greyscale TIFF written tag by tag, for the sample layouts Pillow reads
    but does not write: 12-bit (packed, as cameras and microscopes save), unsigned 32-bit, signed 16-bit."""
    if bits % 8:
        bitstring = "".join(f"{value:0{bits}b}" for value in values)
        bitstring += "0" * (-len(bitstring) % 8)
        data = int(bitstring, 2).to_bytes(len(bitstring) // 8, "big")
    else:
        data = np.array(values, dtype=f"<{'i' if signed else 'u'}{bits // 8}").tobytes()
    tags = {256: len(values), 257: 1, 258: bits, 259: 1, 262: 1, 273: 0, 277: 1, 278: 1, 279: len(data)}
    tags.update({274: orientation, 339: 2 if signed else 1})
    tags[273] = 8 + 2 + 12 * len(tags) + 4  # the pixels follow the one directory
    directory = struct.pack("<H", len(tags))
    directory += b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in sorted(tags.items()))

    def write(folder: Path) -> Path:
        (folder / "grey.tif").write_bytes(b"II*\0" + struct.pack("<I", 8) + directory + b"\0\0\0\0" + data)
        return folder / "grey.tif"

    return write


PALETTE = [255, 0, 0, 10, 20, 30, 0, 0, 255]  # red, a dark grey-blue, blue
WIDE_16 = [0, 129, 386, 51400, 65535]  # /257: 0, 0.502 -> 1, 1.502 -> 2, 200 exactly, 255
WIDE_16_TO_8 = [0, 1, 2, 200, 255]  # nearest, so truncating (0, 0, 1, ...) would fail
WIDE_16_ARRAY = np.array([WIDE_16], dtype=np.uint16)
CASES = {
    "1-png": ("1", saved(row("1", [0, 255, 0, 255]), "x.png"), [0, 255, 0, 255]),
    "L-png": ("L", saved(row("L", [0, 1, 128, 255]), "x.png"), [0, 1, 128, 255]),
    # a PGM's maxval is its white: Pillow scales maxval 100 onto 0..255 itself (50 -> 127.5 -> 128)
    "L-pgm-maxval-100": ("L", netpbm("P5", 100, [0, 50, 100], "x.pgm"), [0, 128, 255]),
    # transparency over white: 100 at alpha 51 (0.2) is 100 * 0.2 + 255 * 0.8 = 224
    "LA-png": (
        "LA",
        saved(row("LA", [(30, 255), (100, 51), (100, 0), (255, 128)]), "x.png"),
        [30, 224, 255, 255],
    ),
    # PNG keeps palette transparency as P plus a transparent index (tRNS)
    "P-png": (
        "P",
        saved(row("P", [0, 1, 2, 1], PALETTE), "x.png", transparency=2),
        [(255, 0, 0), (10, 20, 30), (255, 255, 255), (10, 20, 30)],
    ),
    # no common format stores PA; TIFF is the one Pillow writes it to and reads it back from
    "PA-tif": (
        "PA",
        saved(row("PA", [(0, 255), (1, 255), (2, 0), (1, 51)], PALETTE), "x.tif"),
        [(255, 0, 0), (10, 20, 30), (255, 255, 255), (206, 208, 210)],
    ),
    "RGB-png": (
        "RGB",
        saved(row("RGB", [(0, 0, 0), (1, 2, 3), (200, 10, 10)]), "x.png"),
        [(0, 0, 0), (1, 2, 3), (200, 10, 10)],
    ),
    # 16-bit colour: Pillow makes it 8-bit RGB itself, rounding to nearest as wide grey is rounded
    "RGB-ppm-16-bit": (
        "RGB",
        netpbm("P6", 65535, [51400, 129, 386, 0, 128, 65535], "x.ppm"),
        [(200, 1, 2), (0, 0, 255)],
    ),
    "RGBA-webp": (
        "RGBA",
        saved(row("RGBA", [(10, 20, 30, 255), (200, 10, 10, 51), (0, 0, 0, 0)]), "x.webp", lossless=True),
        [(10, 20, 30), (244, 206, 206), (255, 255, 255)],
    ),
    "CMYK-tif": (
        "CMYK",
        saved(row("CMYK", [(0, 0, 0, 0), (0, 255, 255, 0), (100, 0, 0, 0), (0, 0, 0, 255)]), "x.tif"),
        [(255, 255, 255), (255, 0, 0), (155, 255, 255), (0, 0, 0)],
    ),
    # JPEG stores YCbCr but Pillow opens it as RGB; a YCbCr TIFF opens as YCbCr. For (100, 185, 235):
    # R = Y + 1.402 (Cr - 128) = 250.01, G = Y - 0.344 (Cb - 128) - 0.714 (Cr - 128) = 3.97,
    # B = Y + 1.772 (Cb - 128) = 201.00 (near whole numbers: Pillow's fixed point is off by one elsewhere)
    "YCbCr-tif": (
        "YCbCr",
        saved(row("YCbCr", [(0, 128, 128), (30, 128, 128), (255, 128, 128), (100, 185, 235)]), "x.tif"),
        [(0, 0, 0), (30, 30, 30), (255, 255, 255), (250, 4, 201)],
    ),
    # a 16-bit PGM opens as I: white is 65535 however dark the picture, so 200 is 1, not 200
    "I-pgm-16-bit-dark": ("I", netpbm("P5", 65535, [0, 128, 129, 200, 255], "x.pgm"), [0, 0, 1, 1, 1]),
    "I-pgm-16-bit": ("I", netpbm("P5", 65535, WIDE_16, "x.pgm"), WIDE_16_TO_8),
    # maxval 4095 (12 bits): Pillow rescales it to 0..65535, so 2048 is 2048 / 4095 * 255 = 127.5 -> 128
    "I-pgm-maxval-4095": ("I", netpbm("P5", 4095, [0, 200, 2048, 4095], "x.pgm"), [0, 12, 128, 255]),
    # Pillow writes mode I as signed 32-bit: white is 2**31 - 1, negatives are black
    "I-tif-int32": (
        "I",
        saved(Image.fromarray(np.array([[-5, 51400, 8421505, 2**30, 2**31 - 1]], dtype=np.int32)), "x.tif"),
        [0, 0, 1, 128, 255],
    ),
    "I-tif-uint32": ("I", grey_tiff([51400, 16843009, 2**31, 2**32 - 1], bits=32), [0, 1, 128, 255]),
    "I-tif-int16": ("I", grey_tiff([-100, 0, 200, 16384, 32767], bits=16, signed=True), [0, 0, 2, 128, 255]),
    "I;16-png": ("I;16", saved(Image.fromarray(WIDE_16_ARRAY), "x.png"), WIDE_16_TO_8),
    "I;16-tif": ("I;16", saved(Image.fromarray(WIDE_16_ARRAY), "x.tif"), WIDE_16_TO_8),
    # a 12-bit TIFF opens as I;16 holding 0..4095: white is 4095, not 65535
    "I;16-tif-12-bit": ("I;16", grey_tiff([0, 200, 2048, 4095], bits=12), [0, 12, 128, 255]),
    "I;16B-tif": (
        "I;16B",
        saved(Image.frombytes("I;16B", (5, 1), WIDE_16_ARRAY.astype(">u2").tobytes()), "x.tif"),
        WIDE_16_TO_8,
    ),
    # float samples have no bit depth: [0, 1] is black to white, whatever else the picture holds
    "F-tif": (
        "F",
        saved(Image.fromarray(np.array([[-0.5, 0.0, 0.02, 0.2, 1.0, 3.0]], dtype=np.float32)), "x.tif"),
        [0, 0, 5, 51, 255, 255],
    ),
}


@pytest.mark.parametrize("mode, write, expected", list(CASES.values()), ids=list(CASES))
def test_every_image_mode_loads_as_rgb(tmp_path: Path, mode: str, write, expected: list) -> None:
    """Each mode a real folder can hold, from a file, to the 8-bit RGB values worked out by hand.
    Wide samples are scaled by the white of their format and rounded to the nearest level."""
    path = write(tmp_path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (len(expected), 1)
    pixels = [rgb.getpixel((x, 0)) for x in range(rgb.width)]
    assert pixels == [value if isinstance(value, tuple) else (value,) * 3 for value in expected]


def test_a_rotated_tiff_keeps_the_white_of_its_bit_depth(tmp_path: Path) -> None:
    """EXIF rotation makes a copy without the TIFF tags: the white is read before it."""
    rgb = load_rgb(grey_tiff([0, 200, 2048, 4095], bits=12, orientation=6)(tmp_path))  # 90 degrees
    assert rgb.size == (1, 4) and [rgb.getpixel((0, y))[0] for y in range(4)] == [0, 12, 128, 255]


def test_undecodable_image_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_rgb(bad)
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), "red").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.png"):
        ImageListDataset([(truncated, 0)])[0]


def test_eval_transform_resizes_by_the_crop_ratio_then_crops() -> None:
    pre = Preprocessing().with_overrides(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert pre.resize_size == round(64 * 256 / 224)
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    out = pre.transforms(train=False)(image)
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([2.0, -2.0, -2.0]))  # (x - .5) / .25


def test_train_transform_augments_unless_augment_is_false() -> None:
    pre = Preprocessing().with_overrides(image_size=32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    augmented = pre.transforms(train=True, augment=True)
    torch.manual_seed(0)
    a, b = augmented(image), augmented(image)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
    fixed = pre.transforms(train=True, augment=False)
    torch.testing.assert_close(fixed(image), pre.transforms(train=False)(image), rtol=0, atol=0)


def test_datamodule_batches_follow_the_preprocessing(image_folder: Path) -> None:
    dm = ImageFolderDataModule(image_folder, batch_size=5, num_workers=0, image_size=48)
    assert dm.preprocessing_overrides == {"image_size": 48}
    dm.preprocessing = Preprocessing().with_overrides(image_size=36)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (5, 3, 36, 36) and labels.dtype == torch.int64
    assert len(dm.datasets["train"]) == 36 and len(dm.datasets["val"]) == 12
    assert not dm.has_test
    assert len(dm.test_dataloader().dataset) == 12  # no test/: evaluation falls back to val


def test_num_workers_defaults_to_the_cores_at_most_eight(image_folder: Path) -> None:
    import os

    assert ImageFolderDataModule(image_folder).num_workers == min(8, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("num_workers", -1), ("image_size", 4)])
def test_bad_loader_values_are_refused(image_folder: Path, key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"data.{key}"):
        ImageFolderDataModule(image_folder, **{key: value})


def test_missing_root_and_missing_train(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_splits(tmp_path / "nowhere")
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ folder"):
        find_splits(tmp_path)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=("a", "b"), splits={"train": 2, "val": 1})
    (root / "train" / "empty_one").mkdir()
    with pytest.raises(DataError, match="no images.*empty_one"):
        find_splits(root)


def test_class_mismatch_lists_the_differences(tmp_path: Path) -> None:
    make_image_folder(tmp_path, classes=("a", "b", "c"), splits={"train": 2})
    make_image_folder(tmp_path, classes=("a", "b", "d"), splits={"val": 1})
    with pytest.raises(DataError, match=r"missing from val/: c.*not in train/: d"):
        find_splits(tmp_path)


def test_demo_is_generated_once_deterministically_and_repaired(tmp_path: Path) -> None:
    root = generate_demo(tmp_path / "demo", train_per_class=3, val_per_class=2, size=48)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == len(SHAPES) * 5
    assert {p.parent.name for p in files} == set(SHAPES)
    first = {p.relative_to(root): p.read_bytes() for p in files}
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    generate_demo(root, 3, 2, 48)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # complete: left alone
    files[0].unlink()  # a damaged copy is regenerated
    generate_demo(root, 3, 2, 48)
    again = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}
    assert again == first


def test_demo_never_replaces_a_user_s_folder(tmp_path: Path) -> None:
    users = make_image_folder(tmp_path / "mine", splits={"train": 1})
    before = sorted(users.rglob("*"))
    with pytest.raises(DataError, match="data=imagefolder"):
        generate_demo(users, 3, 2, 48)
    assert sorted(users.rglob("*")) == before


def test_demo_datamodule_prepares_its_data(tmp_path: Path) -> None:
    dm = DemoDataModule(tmp_path / "demo", train_per_class=4, val_per_class=2, num_workers=0)
    dm.prepare_data()
    assert dm.class_names == sorted(SHAPES) and len(dm.splits.train) == 20 and len(dm.splits.val) == 10


def _types(transform: T.Compose) -> list[type]:
    return [type(t) for t in transform.transforms]


@pytest.mark.parametrize(
    "augment, train_types",
    [
        ("basic", [*BASIC_TYPES, *TO_TENSOR]),
        (True, [*BASIC_TYPES, *TO_TENSOR]),  # Hydra's data.augment=true
        ("trivial", [*BASIC_TYPES, T.TrivialAugmentWide, *TO_TENSOR]),
        ("randaugment", [*BASIC_TYPES, T.RandAugment, *TO_TENSOR]),
        (False, EVAL_TYPES),
        (None, EVAL_TYPES),
    ],
)
def test_augment_policies_build_their_train_pipeline_and_leave_eval_alone(
    image_folder: Path, augment: str | bool | None, train_types: list[type]
) -> None:
    dm = ImageFolderDataModule(image_folder, num_workers=0, image_size=32, augment=augment)
    dm.setup("fit")
    assert _types(dm.datasets["train"].transform) == train_types
    assert _types(dm.datasets["val"].transform) == EVAL_TYPES
    assert repr(dm.datasets["val"].transform) == repr(dm.preprocessing.transforms(train=False))
    image, label = dm.datasets["train"][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


def test_augment_off_trains_on_the_deterministic_eval_transform(image_folder: Path) -> None:
    dm = ImageFolderDataModule(image_folder, num_workers=0, image_size=32, augment=False)
    dm.setup("fit")
    train = dm.datasets["train"]
    first, second = train[3][0], train[3][0]
    assert torch.equal(first, second)
    evaluated = ImageListDataset(dm.splits.train, dm.preprocessing.transforms(train=False))[3][0]
    assert torch.equal(first, evaluated)


@pytest.mark.parametrize("augment", ["autoaugment", "Basic", "true", 1])
def test_unknown_augment_policy_is_refused_with_the_choices(image_folder: Path, augment: object) -> None:
    with pytest.raises(ConfigError, match=r"data.augment=.*basic, trivial, randaugment or false"):
        ImageFolderDataModule(image_folder, augment=augment)
    with pytest.raises(ConfigError, match="data.augment"):
        Preprocessing().transforms(train=True, augment=augment)


def test_crop_pct_sets_how_much_of_the_resized_image_evaluation_keeps(image_folder: Path) -> None:
    """crop_pct 1: the short side resized to the input size and nothing cut; null: the weights'
    ratio (224 of 256 here), also for another image size."""
    whole = ImageFolderDataModule(image_folder, num_workers=0, image_size=32, crop_pct=1.0).preprocessing
    assert (whole.image_size, whole.resize_size) == (32, 32)
    assert Preprocessing().with_overrides(crop_pct=0.5).resize_size == 448
    weights = ImageFolderDataModule(image_folder, num_workers=0, image_size=32).preprocessing
    assert (weights.image_size, weights.resize_size) == (32, round(32 * 256 / 224))
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match=rf"data.crop_pct={bad} must lie in \(0, 1\]"):
            ImageFolderDataModule(image_folder, crop_pct=bad)


def test_crop_scale_sets_the_share_of_the_image_the_training_crop_keeps(image_folder: Path) -> None:
    dm = ImageFolderDataModule(image_folder, num_workers=0, image_size=32, crop_scale=[0.5, 1])
    dm.setup("fit")
    crop = dm.datasets["train"].transform.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.5, 1.0)
    default = ImageFolderDataModule(image_folder, num_workers=0, image_size=32).preprocessing
    assert default.transforms(train=True).transforms[0].scale == (0.08, 1.0)
    # the transform's repr is what keys a cache of augmented views: another scale, another key
    assert repr(dm.preprocessing.transforms(True, "basic", dm.crop_scale)) != repr(
        default.transforms(train=True)
    )


@pytest.mark.parametrize("crop_scale", [[0, 1], [0.9, 0.5], [0.5], [0.5, 1.5]])
def test_a_crop_scale_that_is_not_a_share_of_the_area_is_refused(image_folder: Path, crop_scale) -> None:
    with pytest.raises(
        ConfigError, match=r"data.crop_scale=.* must be \[min, max\] with 0 < min <= max <= 1"
    ):
        ImageFolderDataModule(image_folder, crop_scale=crop_scale)


@pytest.mark.slow  # about a second or more
def test_hydra_overrides_reach_the_datamodule(compose_train, image_folder: Path, tmp_path: Path) -> None:
    base = ["data=imagefolder", f"data.root={image_folder}", "data.num_workers=0"]
    defaults = instantiate(compose_train(tmp_path, base).data)
    assert (defaults.augment, defaults.balance, defaults.mixup_alpha, defaults.cutmix_alpha) == (
        "basic",
        "none",
        0.0,
        0.0,
    )
    assert defaults.batch_mix is None and defaults.class_weights() is None
    chosen = [
        "data.augment=trivial",
        "data.balance=sampler",
        "data.mixup_alpha=0.2",
        "data.crop_scale=[0.4,1]",
    ]
    dm = instantiate(compose_train(tmp_path, [*base, *chosen]).data)
    assert (dm.augment, dm.balance, dm.mixup_alpha, dm.crop_scale) == ("trivial", "sampler", 0.2, (0.4, 1.0))
    assert isinstance(dm.batch_mix, T.MixUp)
    assert instantiate(compose_train(tmp_path, [*base, "data.augment=true"]).data).augment == "basic"
    assert instantiate(compose_train(tmp_path, [*base, "data.augment=false"]).data).augment is None


@pytest.fixture
def imbalanced_folder(tmp_path: Path) -> Path:
    """Train: 6 images of class a, 2 of class b (75/25); val: 1 each."""
    root = tmp_path / "imbalanced"
    make_image_folder(root, classes=("a",), splits={"train": 6, "val": 1}, size=32)
    return make_image_folder(root, classes=("b",), splits={"train": 2, "val": 1}, size=32)


def test_class_counts_and_balanced_weights(imbalanced_folder: Path) -> None:
    dm = ImageFolderDataModule(imbalanced_folder, num_workers=0, balance="weights")
    assert dm.class_names == ["a", "b"] and dm.class_counts == [6, 2]
    assert dm.class_weights() == [8 / (2 * 6), 8 / (2 * 2)]
    for balance in ("none", "sampler", None):
        assert ImageFolderDataModule(imbalanced_folder, balance=balance).class_weights() is None


def _draws(dm: ImageFolderDataModule, epochs: int) -> list[int]:
    """The training indices the train loader's sampler draws in `epochs` (keys are epoch * n + index)."""
    sampler, n = dm.train_dataloader().sampler, len(dm.splits.train)
    draws = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert all(epoch * n <= key < (epoch + 1) * n for key in keys)
        draws += [key % n for key in keys]
    return draws


def _class_fraction(dm: ImageFolderDataModule, epochs: int) -> float:
    """The fraction of class 0 among the samples drawn in `epochs`."""
    labels = [dm.splits.train[i][1] for i in _draws(dm, epochs)]
    return labels.count(0) / len(labels)


def test_sampler_draws_the_classes_evenly_and_shuffling_does_not(imbalanced_folder: Path) -> None:
    common = {"batch_size": 4, "num_workers": 0, "image_size": 32}
    balanced = ImageFolderDataModule(imbalanced_folder, balance="sampler", seed=3, **common)
    loader = balanced.train_dataloader()
    assert isinstance(loader.sampler, EpochSampler) and len(loader.sampler) == 8
    torch.testing.assert_close(loader.sampler.weights, torch.tensor([1 / 6] * 6 + [1 / 2] * 2).double())
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    assert 0.4 <= _class_fraction(balanced, epochs=250) <= 0.6  # 2000 draws, with replacement
    shuffled = ImageFolderDataModule(imbalanced_folder, balance="none", **common)
    assert shuffled.train_dataloader().sampler.weights is None
    assert _class_fraction(shuffled, epochs=250) == 0.75
    assert sorted(_draws(shuffled, 1)) == list(range(8))  # a permutation


def test_sampler_is_seeded_by_data_seed(imbalanced_folder: Path) -> None:
    def draws(seed: int) -> list[int]:
        return _draws(
            ImageFolderDataModule(imbalanced_folder, num_workers=0, balance="sampler", seed=seed), 4
        )

    assert draws(5) == draws(5) != draws(6)


def test_epoch_order_is_a_function_of_seed_and_epoch_and_a_resume_skips_what_was_trained() -> None:
    def order(epoch: int, skip: int = 0, seed: int = 1) -> list[int]:
        sampler = EpochSampler(10, seed, skip=skip)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(2) == order(2) and order(2) != order(3) and order(2, seed=2) != order(2)
    assert order(2, skip=4) == order(2)[4:]
    sampler = EpochSampler(10, 1, skip=4)
    assert len(list(sampler)) == 6 and len(list(sampler)) == 10  # the skip applies once


def test_augmentation_is_a_function_of_seed_epoch_and_index_and_leaves_the_global_rng(
    image_folder: Path,
) -> None:
    dm = ImageFolderDataModule(image_folder, num_workers=0, image_size=32, seed=7)
    dm.setup()
    train = dm.datasets["train"]
    n = len(train)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = train[2 * n + 5][0]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)  # whatever the global state, the sample is the same
    assert torch.equal(train[2 * n + 5][0], first)
    assert not torch.equal(train[3 * n + 5][0], first)  # another epoch, another augmentation


@pytest.mark.parametrize("balance", ["oversample", "None", True])
def test_unknown_balance_mode_is_refused_with_the_choices(image_folder: Path, balance: object) -> None:
    with pytest.raises(ConfigError, match=r"data.balance=.*none, weights, sampler"):
        ImageFolderDataModule(image_folder, balance=balance)


def _batch(num_classes: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(6) % num_classes


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_gives_soft_targets_on_training_batches_only(
    image_folder: Path, mixup: float, cutmix: float
) -> None:
    dm = ImageFolderDataModule(image_folder, num_workers=0, mixup_alpha=mixup, cutmix_alpha=cutmix)
    images, labels = _batch()
    torch.manual_seed(0)
    dm.trainer = SimpleNamespace(training=True)
    mixed, targets = dm.on_after_batch_transfer((images.clone(), labels), 0)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert targets.shape == (6, 3) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert bool((targets >= 0).all()) and bool((targets[torch.arange(6), labels] > 0).all())
    assert bool(((targets > 0).sum(dim=1) <= 2).all())  # each image mixes with one other
    for trainer in (SimpleNamespace(training=False), None):  # validation, test, or no trainer
        dm.trainer = trainer
        batch = (images, labels)
        assert dm.on_after_batch_transfer(batch, 0) is batch


def test_mixup_blends_images_and_targets_by_the_same_amount(image_folder: Path) -> None:
    dm = ImageFolderDataModule(image_folder, num_workers=0, mixup_alpha=0.4)
    dm.trainer = SimpleNamespace(training=True)
    images, labels = _batch()
    torch.manual_seed(1)
    mixed, targets = dm.on_after_batch_transfer((images.clone(), labels), 0)
    lam = float(targets[0, labels[0]])  # image 0 is mixed with image 5 (the batch rolled by one)
    assert 0.0 < lam < 1.0 and float(targets[0, labels[5]]) == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed[0], lam * images[0] + (1 - lam) * images[5])


def test_no_mixing_by_default_even_while_training(image_folder: Path) -> None:
    dm = ImageFolderDataModule(image_folder, num_workers=0)
    dm.trainer = SimpleNamespace(training=True)
    batch = _batch()
    assert dm.batch_mix is None and dm.on_after_batch_transfer(batch, 0) is batch


@pytest.mark.parametrize("key", ["mixup_alpha", "cutmix_alpha"])
def test_negative_mix_alpha_is_refused(image_folder: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"data.{key}=-0.1"):
        ImageFolderDataModule(image_folder, **{key: -0.1})

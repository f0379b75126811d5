"""Finding the splits and classes of an image-folder dataset, and checking they agree."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from transferkit.data.images import IMAGE_EXTENSIONS, is_image_file
from transferkit.data.samples import Sample
from transferkit.data.splitting import split_off_val
from transferkit.errors import ConfigError, DataError

LAYOUT = "<root>/train/<class>/<image>, <root>/val/<class>/<image> (optional: test/)"
_JUNK_DIRS = {"__MACOSX"}


@dataclass(frozen=True)
class Splits:
    """The samples of every split, labelled by the index of their class in `class_names`, or
    with `multilabel` by a tuple of one 0/1 per class (all zeros: an image with no label)."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] | None
    val_from_train: bool
    multilabel: bool = False
    pool: list[Sample] | None = None  # cross-validation: every fold's train + val (data.folds)


def _is_visible_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and path.name not in _JUNK_DIRS


def list_images(folder: Path) -> list[Path]:
    """The image files below `folder` (sub-folders included, hidden and junk ones skipped), sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _JUNK_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(Path(f)))
    return files


def list_class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files below its folder (sub-folders included)."""
    classes = {d.name: list_images(d) for d in sorted(p for p in split_dir.iterdir() if _is_visible_dir(p))}
    if not classes:
        raise DataError(f"{split_dir} holds no class folders. Expected layout: {LAYOUT}.")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(
            f"Class folder(s) with no images in {split_dir}: {', '.join(empty)}. Add images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder(s)."
        )
    return classes


def _check_same_classes(split: str, found: list[str], expected: list[str]) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = [f"missing from {split}/: {', '.join(missing)}"] if missing else []
        parts += [f"not in train/: {', '.join(extra)}"] if extra else []
        raise DataError(
            f"{split}/ and train/ hold different classes ({'; '.join(parts)}). "
            f"Make the class folders of every split the same."
        )


def find_splits(root: str | Path, val_fraction: float = 0.2, seed: int | None = 42) -> Splits:
    """Scan `root`; classes come from train/, other splits must hold the same ones. Without val/,
    val is split off train/ file by file (`transferkit.data.splitting`)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root={root} does not exist. Set data.root=PATH to a folder laid out as {LAYOUT}."
        )
    if not (root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder. Expected layout: {LAYOUT}.")
    train_files = list_class_files(root / "train")
    class_names = list(train_files)

    def labelled(files: dict[str, list[Path]]) -> list[Sample]:
        return [(path, class_names.index(name)) for name in class_names for path in files[name]]

    splits: dict[str, list[Sample]] = {}
    for split in ("val", "test"):
        if (root / split).is_dir():
            files = list_class_files(root / split)
            _check_same_classes(split, list(files), class_names)
            splits[split] = labelled(files)

    train = labelled(train_files)
    if "val" in splits:
        return Splits(class_names, train, splits["val"], splits.get("test"), val_from_train=False)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1) when {root} has no val/.")
    train, val = split_off_val(train, val_fraction, seed, root)
    if not val:
        raise DataError(
            f"{root} has no val/ and too few images to split one off (a class needs 2 or more); "
            f"add {root}/val/<class>/ folders or more images."
        )
    return Splits(class_names, train, val, splits.get("test"), val_from_train=True)


def class_counts(samples: list[Sample], num_classes: int) -> list[int]:
    """Images per class, or with multi-label samples the images each class is present in."""
    counts = [0] * num_classes
    for _, label in samples:
        if isinstance(label, tuple):
            counts = [n + present for n, present in zip(counts, label, strict=True)]
        else:
            counts[label] += 1
    return counts


def untrained_classes(splits: Splits) -> list[str]:
    """The classes no training image has: a model cannot learn them."""
    counts = class_counts(splits.train, len(splits.class_names))
    return [name for name, count in zip(splits.class_names, counts, strict=True) if count == 0]


def skip_files(splits: Splits, bad: set[Path], without: str = "the unreadable files") -> Splits:
    """`splits` without the `bad` files; a class left with no training image is an error
    ("Without `without`, ...")."""

    def keep(samples: list[Sample] | None) -> list[Sample] | None:
        return None if samples is None else [s for s in samples if s[0] not in bad]

    kept = replace(
        splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test), pool=keep(splits.pool)
    )
    emptied = untrained_classes(kept)
    if emptied:
        names = ", ".join(emptied)
        raise DataError(f"Without {without}, class(es) {names} have no training image.")
    return kept


def read_exclude(file: str | Path, root: Path) -> set[str]:
    """The absolute paths `file` lists, one a line (relative to `root`, or absolute; blank lines
    and lines starting with # are skipped): what data.exclude leaves out."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise DataError(f"data.exclude={file} does not exist; give a file listing one image path a line.")
    lines = (line.strip() for line in file.read_text(encoding="utf-8").splitlines())
    return {os.path.abspath(root / line) for line in lines if line and not line.startswith("#")}


def exclude_files(splits: Splits, excluded: set[str], file: str | Path) -> tuple[Splits, int, int]:
    """(`splits` without the images listed, how many were left out, how many listed paths are
    not in the data)."""
    samples = [*splits.train, *splits.val, *(splits.test or [])]
    present = {str(path): os.path.abspath(path) for path, _ in samples}
    dropped = {Path(p) for p, absolute in present.items() if absolute in excluded}
    left = skip_files(splits, dropped, without=f"the images data.exclude={file} lists")
    return left, len(dropped), len(excluded - set(present.values()))

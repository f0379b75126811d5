"""Labels read from file names: a regular expression whose one group is the class, searched in
each file's name (`^(.+)_\\d+\\.jpg$` reads `Abyssinian` from `Abyssinian_12.jpg`).

The images lie in a split tree, root/train, root/val (optional) and root/test (optional), each
searched at any depth, or in one folder (any depth), whose val/ and test/ sub-folders, when it has
them, are those splits and never trained on. Without val, val is split off file by file
(`transferkit.data.splitting`).
"""

from __future__ import annotations

import re
from pathlib import Path

from transferkit.data.folders import Splits, list_images
from transferkit.data.images import IMAGE_EXTENSIONS
from transferkit.data.samples import Sample
from transferkit.data.splitting import split_off_val
from transferkit.errors import ConfigError, DataError

SHOWN = 5  # file names a message lists before "and N more"


def label_pattern(pattern: str) -> re.Pattern[str]:
    """`data.label_from` compiled, refused unless it has exactly one group (the label)."""
    try:
        compiled = re.compile(str(pattern))
    except re.error as error:
        raise ConfigError(f"data.label_from={pattern!r} is not a regular expression ({error}).") from None
    if compiled.groups != 1:
        raise ConfigError(
            f"data.label_from={pattern!r} has {compiled.groups} groups; it needs exactly one, around the "
            r"label, as in '^(.+)_\d+\.jpg$' (write other groups as (?:...))."
        )
    return compiled


def _named(files: list[Path], root: Path) -> str:
    shown = ", ".join(str(path.relative_to(root)) for path in files[:SHOWN])
    return shown + (f" and {len(files) - SHOWN} more" if len(files) > SHOWN else "")


def labels_from_names(files: list[Path], pattern: re.Pattern[str], root: Path) -> list[tuple[Path, str]]:
    """(file, label) for every file; a file the pattern does not match (or matches with an empty
    group) is an error, so no image is silently left out."""
    labelled, unmatched = [], []
    for path in files:
        match = pattern.search(path.name)
        if match and match.group(1):
            labelled.append((path, match.group(1)))
        else:
            unmatched.append(path)
    if not labelled:
        raise DataError(
            f"data.label_from={pattern.pattern!r} matches none of the {len(files)} file names under "
            f"{root} (e.g. {_named(files, root)}); write it for names like these."
        )
    if unmatched:
        raise DataError(
            f"data.label_from={pattern.pattern!r} leaves {len(unmatched)} of {len(files)} file(s) under "
            f"{root} unmatched: {_named(unmatched, root)}; widen the expression or move those files out."
        )
    return labelled


def _images(folder: Path) -> list[Path]:
    files = list_images(folder)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return files


def _split_files(root: Path) -> dict[str, list[Path]]:
    """Each split's images. With root/train/ the split folders; without it, val/ and test/ (if
    there) are still those splits, and train is every image of root outside them: a test folder
    is never trained on."""
    folders = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in folders or not folders:
        return {split: _images(folder) for split, folder in (folders or {"train": root}).items()}
    outside = [p for p in list_images(root) if not any(p.is_relative_to(f) for f in folders.values())]
    if not outside:
        held = " and ".join(f"{name}/" for name in folders)
        raise DataError(
            f"{root} holds no images to train on outside {held}; put the training images in "
            f"{root}/train/ (or anywhere else under {root})."
        )
    return {"train": outside, **{split: _images(folder) for split, folder in folders.items()}}


def find_named_splits(
    root: str | Path, pattern: str, val_fraction: float = 0.2, seed: int | None = 42
) -> Splits:
    """The splits of `root` (`_split_files`) with every class read from a file name; classes are
    the sorted labels of the training images."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist. Set data.root=PATH to the folder of images.")
    compiled = label_pattern(pattern)
    named = {split: labels_from_names(files, compiled, root) for split, files in _split_files(root).items()}
    class_names = sorted({label for _, label in named["train"]})
    unseen = sorted({label for s in ("val", "test") for _, label in named.get(s, [])} - set(class_names))
    if unseen:
        raise DataError(
            f"Class(es) {', '.join(unseen[:SHOWN])} are seen only in val or test under {root}; add "
            "training images for them or remove those images."
        )
    index = {name: i for i, name in enumerate(class_names)}

    def samples(split: str) -> list[Sample]:
        return sorted((path, index[label]) for path, label in named[split])

    test = samples("test") if "test" in named else None
    if "val" in named:
        return Splits(class_names, samples("train"), samples("val"), test, val_from_train=False)
    train, val = split_off_val(samples("train"), val_fraction, seed, root)
    if not val:
        raise DataError(
            f"{root} has too few images to split off val (a class needs 2 or more); add images or a "
            f"{root}/val/ folder."
        )
    return Splits(class_names, train, val, test, val_from_train=True)

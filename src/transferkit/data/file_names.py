"""Labels read from file names: a regular expression whose one group is the class, searched in
each file's name (`^(.+)_\\d+\\.jpg$` reads `Abyssinian` from `Abyssinian_12.jpg`).

The images lie in one folder (any depth; val is split off, stratified and seeded) or in a split
tree, root/train, root/val (optional) and root/test (optional), each searched at any depth.
"""

from __future__ import annotations

import re
from pathlib import Path

from transferkit.data.folders import Sample, Splits, list_images, stratified_split
from transferkit.data.images import IMAGE_EXTENSIONS
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


def find_named_splits(
    root: str | Path, pattern: str, val_fraction: float = 0.2, seed: int | None = 42
) -> Splits:
    """The splits of `root` (a split tree when it has train/, else one folder) with every class
    read from a file name; classes are the sorted labels of the training images."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist. Set data.root=PATH to the folder of images.")
    compiled = label_pattern(pattern)
    folders = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    folders = folders if "train" in folders else {"train": root}  # no split tree: one folder
    named = {split: labels_from_names(_images(folder), compiled, root) for split, folder in folders.items()}
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
    train, val = stratified_split(samples("train"), val_fraction, seed)
    if not val:
        raise DataError(
            f"{root} has too few images to split off val (a class needs 2 or more); add images or a "
            f"{root}/val/ folder."
        )
    return Splits(class_names, train, val, test, val_from_train=True)

"""The images an audit looks at: every split's samples in one list (train, val, test), which
every finding indexes into."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transferkit.data.folders import Splits
from transferkit.data.samples import Label

SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    path: Path
    split: str
    label: Label  # a class index, or with multi-label data one 0/1 per class


def all_items(splits: Splits) -> list[Item]:
    return [
        Item(Path(path), name, label) for name in SPLIT_ORDER for path, label in (getattr(splits, name) or [])
    ]


def label_text(label: Label, class_names: list[str]) -> str:
    """A label as a person reads it: the class, or with multi-label data the classes joined by ';'."""
    if isinstance(label, tuple):
        return ";".join(name for name, on in zip(class_names, label, strict=True) if on)
    return class_names[label]


def shown_path(path: Path, root: Path) -> str:
    """`path` relative to the data's root when it lies below it (what data.exclude reads), else absolute."""
    path, root = Path(path).resolve(), Path(root).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)

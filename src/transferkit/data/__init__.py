"""Image folders and label files as LightningDataModules.

The datamodules are imported on first use: `scripts/split_folder.py` and the other light users of
`transferkit.data.*` do not pay for importing Lightning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferkit.data.datamodule import ImageFolderDataModule
    from transferkit.data.demo import DemoDataModule
    from transferkit.data.label_file_module import LabelFileDataModule

_LAZY = {
    "DemoDataModule": "transferkit.data.demo",
    "ImageFolderDataModule": "transferkit.data.datamodule",
    "LabelFileDataModule": "transferkit.data.label_file_module",
}

__all__ = ["DemoDataModule", "ImageFolderDataModule", "LabelFileDataModule"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

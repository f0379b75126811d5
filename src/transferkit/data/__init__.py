"""Image folders as LightningDataModules.

The datamodules are imported on first use: `scripts/split_folder.py` and the other light users of
`transferkit.data.*` do not pay for importing Lightning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferkit.data.datamodule import ImageFolderDataModule
    from transferkit.data.demo import DemoDataModule

_LAZY = {
    "DemoDataModule": "transferkit.data.demo",
    "ImageFolderDataModule": "transferkit.data.datamodule",
}

__all__ = ["DemoDataModule", "ImageFolderDataModule"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

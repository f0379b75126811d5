"""Image folders as LightningDataModules.

The datamodules are imported on first use: `scripts/split_folder.py` and the other light users of
`transferkit.data.*` do not pay for importing Lightning."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DemoDataModule": "transferkit.data.demo",
    "ImageFolderDataModule": "transferkit.data.datamodule",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

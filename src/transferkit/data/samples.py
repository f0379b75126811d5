"""What every data module hands on: a sample is an image's path and its label."""

from __future__ import annotations

from pathlib import Path

Label = int | tuple[int, ...]  # a class index, or with multi-label data one 0/1 per class
Sample = tuple[Path, Label]

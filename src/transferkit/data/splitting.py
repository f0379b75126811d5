"""Which split a file is in, as a function of the file: a stable hash of its path under the data
root and the seed, never of the files beside it.

Each file gets a number in [0, 1): the first 8 bytes of sha256(f"{seed}:{path under the root}").
It is in val when the number is below `val_fraction`, and in fold floor(number * k) of k folds
(`transferkit.data.folds`).
So adding, removing or renaming a file moves no other file between train, val and the folds,
and moving the whole root elsewhere moves nothing. Sizes follow the fraction within a hash's
spread (binomial), not exactly.

One exception keeps a guarantee the split has always given: a class (a stratum) of two or more
images holds out at least one and trains on at least one. A class none of whose images falls
below the fraction lends val its lowest-numbered image; one all of whose images do keeps its
highest in train. Only that lent (or kept) image can change sides when its class gains or loses
a file; the checkpoint's digests (`transferkit.data.digests`) catch it. Multi-label data adds the
one other exception: a class val would take whole gets an image back (`label_file`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transferkit.data.samples import Sample

_SCALE = float(2**64)


def file_key(path: Path, root: Path) -> str:
    """The file's path under `root`, with / separators: what names it wherever the root lies.
    Files listed below the root (all but a label file's absolute paths elsewhere) are cut as
    text, five times faster than os.path.relpath, which matters at a million files."""
    path_text = os.fspath(path)
    for base in (os.fspath(root), os.path.abspath(root)):
        prefix = os.path.join(base, "")
        if path_text.startswith(prefix):
            return path_text[len(prefix) :].replace(os.sep, "/")
    return os.path.relpath(os.path.abspath(path_text), os.path.abspath(root)).replace(os.sep, "/")


def file_number(key: str, seed: int | None) -> float:
    """The file's number in [0, 1): uniform, fixed by the seed and its key alone."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def numbering(root: Path, seed: int | None) -> Callable[[Path], float]:
    """path -> its number under `root` and `seed`."""
    root = Path(root).expanduser()
    return lambda path: file_number(file_key(path, root), seed)


def _held_out(items: list[Sample], number: dict[Path, float], fraction: float) -> set[Path]:
    """The stratum's val files: those numbered below `fraction`, with at least one and at most
    all but one when it has two or more (a stratum of one trains on it)."""
    if len(items) < 2:
        return set()
    ranked = sorted(items, key=lambda s: (number[s[0]], s[0]))
    held = [s for s in ranked if number[s[0]] < fraction]
    if not held:
        held = ranked[:1]
    elif len(held) == len(ranked):
        held = held[:-1]
    return {path for path, _ in held}


def split_off_val(
    samples: list[Sample],
    fraction: float,
    seed: int | None,
    root: Path,
    stratum: Callable[[Sample], Hashable] = lambda sample: sample[1],
) -> tuple[list[Sample], list[Sample]]:
    """(train, val): each file in val when its number is below `fraction`, with the guarantee
    above applied per stratum (the class by default); both sorted by path."""
    number = numbering(root, seed)
    numbers = {path: number(path) for path, _ in samples}
    by_stratum: dict[Hashable, list[Sample]] = {}
    for sample in samples:
        by_stratum.setdefault(stratum(sample), []).append(sample)
    held: set[Path] = set()
    for items in by_stratum.values():
        held |= _held_out(items, numbers, fraction)
    train = sorted(s for s in samples if s[0] not in held)
    val = sorted(s for s in samples if s[0] in held)
    return train, val

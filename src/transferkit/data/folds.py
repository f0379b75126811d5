"""Cross-validation folds: the training data cut into k parts, each in turn the validation split
of a model trained on the others. A file's fold is a function of the file alone (the hash of its
path under the root and the seed: `transferkit.data.splitting`), so adding or removing images moves
no other image to another fold; each fold holds a share of every class within a hash's spread, not
exactly 1/k. A class of n images falls wholly in one of k folds with probability k ** (1 - n) (2
images, 5 folds: 20%), leaving that fold nothing of it to train on: refused, since fewer folds only
make it likelier.

The pool is what the run would train on: train/ (with the val split it would have cut from it),
the label file's train rows, or the named files. A val/ folder or val rows of its own, or a test
split, is not in the pool: it stays held out, untouched by every fold, and is measured at the end
as the fold's test split (test/ when the data has one, else its own val).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transferkit.data.folders import Splits, untrained_classes
from transferkit.data.samples import Sample
from transferkit.data.splitting import numbering
from transferkit.errors import ConfigError, DataError


def check_folds(folds: int | None, fold: int | None) -> tuple[int | None, int | None]:
    """`data.folds` (k >= 2, or null: no cross-validation) and `data.fold` (0..k-1, or null:
    every fold, one after the other)."""
    if folds is None:
        if fold is not None:
            raise ConfigError(f"data.fold={fold} needs data.folds=K, the number of folds it is one of.")
        return None, None
    if isinstance(folds, bool) or int(folds) < 2:
        raise ConfigError(f"data.folds={folds} must be 2 or more (null: no cross-validation).")
    if fold is not None and not 0 <= int(fold) < int(folds):
        raise ConfigError(f"data.fold={fold} must lie in 0..{int(folds) - 1} (data.folds={folds}).")
    return int(folds), None if fold is None else int(fold)


def assign_folds(samples: list[Sample], folds: int, seed: int | None, root: Path) -> dict[Path, int]:
    """Each image's fold, floor(its number * folds), from its own path under `root` and the seed:
    blind to the order the samples are listed in and to which other images there are."""
    number = numbering(root, seed)
    return {path: min(int(number(path) * folds), folds - 1) for path, _ in samples}


def cross_validation_fold(splits: Splits, folds: int, fold: int, seed: int | None, root: Path) -> Splits:
    """`splits` as fold `fold` of `folds` sees them: val is that part of the pool, train the
    rest, test the held-out split (if any); `pool` keeps the whole pool, so every fold can share
    one feature cache."""
    pool = sorted(splits.train + splits.val) if splits.val_from_train else sorted(splits.train)
    held_out = splits.test if splits.test is not None else (None if splits.val_from_train else splits.val)
    assigned = assign_folds(pool, folds, seed, root)
    val = [s for s in pool if assigned[s[0]] == fold]
    train = [s for s in pool if assigned[s[0]] != fold]
    if not val:
        raise DataError(f"data.folds={folds} leaves fold {fold} empty: the pool has {len(pool)} images.")
    cut = replace(splits, train=train, val=val, test=held_out, val_from_train=True, pool=pool)
    untrained = untrained_classes(cut)
    if untrained:
        raise DataError(
            f"Fold {fold} of {folds} has no training image of class(es) {', '.join(untrained)}: all their "
            "images fall in this fold; add images of them, try another seed (a new cross-validation), "
            "or leave them out with data.exclude."
        )
    return cut

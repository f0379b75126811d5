"""Time transfer learning with a frozen backbone: the classic PyTorch loop against transferkit.

    python scripts/benchmark.py                       # 480 images, 224 px, 10 epochs, auto device
    python scripts/benchmark.py --images 40 --epochs 2 --size 64 --out /tmp/tk-small   # a quick try
    python scripts/benchmark.py scale                 # head epochs on 10k, 100k, 1M cached rows
    python scripts/benchmark.py runtime               # onnxruntime vs eager and bare: Lite0, ResNet-50

One generated image folder (circles vs triangles drawn by transferkit.data.demo, with distractor
stickers, colour jitter and pixel noise; split 80/20 into train/ and val/, written once under
--out) and one backbone (timm:tf_efficientnet_lite0 with the weights a pip package ships, so no
network is needed). In one run it times:

  (a)  the PyTorch transfer-learning tutorial loop: plain PyTorch, ImageFolder, RandomResizedCrop +
       flip recomputed every epoch, batch 4, 4 workers, model.train(), frozen backbone, new Linear
       head, SGD(1e-3, momentum 0.9), StepLR(7, 0.1), fp32, a val pass every epoch;
  (b)  transferkit's train task with features.cache=false;
  (c)  transferkit with features.cache=true and an empty cache directory (building it is timed);
  (c') the same again, reusing the cache (what every run of a sweep after the first costs);
  (b0), (c0) (b) and (c) with data.augment=false, to compare their val accuracy exactly;
  (d)  the floor: one inference pass of the backbone over train + val (decode included), on
       what a frozen run uses: onnxruntime on a CPU (fp32), else transferkit's frozen_forward in
       the device's fastest native precision, channels_last, under torch.inference_mode();
  (p)  fine-tuning the top: finetune=partial (the last block trains) at data.augment=false for
       --partial-epochs epochs, uncached against the prefix cache (the activations below the
       last block, built once), for Lite0 (its shipped weights) and ResNet-50 (weights=null:
       random weights time the same); an epoch (train + val) of each, and their val accuracy;
and the decode throughput alone (DataLoader with the evaluation transforms, no model).

(a), (b) and (c) are timed from building the model to the trained model: (b) and (c) time the
whole train(cfg) call (config, model, Lightning, checkpoints, the final validation of the best
checkpoint). (d) excludes building the model and one warm-up batch: it is the steady state.

It prints a markdown table and the machine, says whether the targets hold, and writes the same
to --out/benchmark.md. --only-partial runs the (p) rows alone. Nothing here is used by the package.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image, ImageEnhance
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from transferkit.backbones import Backbone, build_backbone
from transferkit.data.datamodule import default_num_workers
from transferkit.data.demo import draw_shape
from transferkit.data.images import ImageListDataset
from transferkit.features.precision import frozen_forward, native_bf16, resolve_precision
from transferkit.runtime import resolve_runtime, session_for
from transferkit.tasks.train import train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MODEL = "timm:tf_efficientnet_lite0"
WEIGHTS = "shipped"
CLASSES = ("circle", "triangle")
DISTRACTORS = ("square", "star", "cross")
VAL_FRACTION = 0.2
DATA_VERSION = 2
SEED = 42
TUTORIAL_BATCH = 4
TUTORIAL_WORKERS = 4
FLOOR_BATCH = 32  # conf/data/imagefolder.yaml's data.batch_size, which transferkit's loaders use
PARTIAL_MODELS = {  # (p): name -> model overrides
    "Lite0": ["model=efficientnet_lite0"],
    "ResNet-50": ["model=resnet50", "model.weights=null"],
}


# --------------------------------------------------------------------------- the data


def noisy_shape(shape: str, seed: int, size: int) -> Image.Image:
    """A small demo shape on its own patch, over a large distractor shape, with distractor
    stickers that may occlude it, colour jitter and pixel noise."""
    rng = np.random.default_rng(seed)

    def distractor(side: int) -> Image.Image:
        return draw_shape(DISTRACTORS[int(rng.integers(len(DISTRACTORS)))], int(rng.integers(2**31)), side)

    def place(patch: Image.Image) -> None:
        free = size - patch.width + 1
        image.paste(patch, (int(rng.integers(0, free)), int(rng.integers(0, free))))

    image = distractor(size)
    place(draw_shape(shape, seed, max(8, int(size * rng.uniform(0.3, 0.55)))))
    for _ in range(int(rng.integers(0, 3))):
        place(distractor(max(8, int(size * rng.uniform(0.15, 0.35)))))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.5, 1.5))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.3, 1.7))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, rng.uniform(15.0, 60.0), pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def generate_dataset(root: Path, images: int, size: int) -> Path:
    """root/{train,val}/{circle,triangle}/*.jpg, written once (a marker says which settings)."""
    marker = root / ".benchmark.json"
    wanted = {"version": DATA_VERSION, "images": images, "size": size, "classes": list(CLASSES)}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    shutil.rmtree(root, ignore_errors=True)
    per_class = images // len(CLASSES)
    n_val = round(per_class * VAL_FRACTION)
    for label, shape in enumerate(CLASSES):
        for i in range(per_class):
            split = "val" if i < n_val else "train"
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            noisy_shape(shape, 1_000_003 * (label + 1) + i, size).save(folder / f"{i:04d}.jpg", quality=90)
    marker.write_text(json.dumps(wanted))
    return root


def samples(root: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(train, val) lists of (path, label) in ImageFolder's order."""
    train_set, val_set = datasets.ImageFolder(root / "train"), datasets.ImageFolder(root / "val")
    return (
        [(Path(p), y) for p, y in train_set.samples],
        [(Path(p), y) for p, y in val_set.samples],
    )


# --------------------------------------------------------------------------- the rows


@dataclass
class Row:
    key: str
    name: str
    wall_s: float
    images: int  # images the row accounts for: epochs x (train + val), or one pass for (d)
    val_acc: float | None = None
    epochs: int | None = None
    other_cpu: float | None = None  # share of the machine's CPU that other processes used meanwhile

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def watched(run: Callable[..., Row], *args: Any) -> Row:
    """Run one row and note how much of the machine other processes took meanwhile: the
    timings only mean something when that is near 0."""
    busy, own, started = busy_cpu_s(), own_cpu_s(), time.perf_counter()
    row = run(*args)
    gc.collect()  # shuts the row's DataLoader workers down, so their CPU time is counted as ours
    busy_after, own_after, window = busy_cpu_s(), own_cpu_s(), time.perf_counter() - started
    if busy is not None and busy_after is not None:
        cores = os.cpu_count() or 1
        row.other_cpu = max(0.0, (busy_after - busy) - (own_after - own)) / (window * cores)
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tutorial_loop(root: Path, epochs: int, device: torch.device) -> Row:
    """(a) The PyTorch transfer-learning tutorial's train_model, with this backbone. Timed from
    building the model, as train(cfg) is."""
    torch.manual_seed(SEED)
    sync(device)
    started = time.perf_counter()
    backbone = build_backbone(MODEL, WEIGHTS)
    pre = backbone.preprocessing
    normalize = T.Normalize(list(pre.mean), list(pre.std))
    tfs = {
        "train": T.Compose(
            [T.RandomResizedCrop(pre.image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        ),
        "val": T.Compose([T.Resize(pre.resize_size), T.CenterCrop(pre.image_size), T.ToTensor(), normalize]),
    }
    for p in backbone.model.parameters():
        p.requires_grad = False
    model = nn.Sequential(backbone.model, nn.Linear(backbone.num_features, len(CLASSES))).to(device)
    image_sets = {split: datasets.ImageFolder(root / split, tfs[split]) for split in ("train", "val")}
    loaders = {
        split: DataLoader(ds, batch_size=TUTORIAL_BATCH, shuffle=True, num_workers=TUTORIAL_WORKERS)
        for split, ds in image_sets.items()
    }
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model[1].parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_acc, best_state = -1.0, copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            correct = 0
            for inputs, labels in loaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                scheduler.step()
            else:
                acc = correct / len(image_sets["val"])
                if acc > best_acc:  # the tutorial keeps the best epoch's weights
                    best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    sync(device)
    wall = time.perf_counter() - started
    n = sum(len(ds) for ds in image_sets.values())
    return Row("a", "(a) PyTorch tutorial loop", wall, epochs * n, best_acc, epochs)


def compose_train(out: Path, run: str, overrides: Sequence[str]) -> DictConfig:
    """conf/train.yaml composed as the command line would (as tests/conftest.py does)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"paths.root_dir={out}", *overrides])
    output_dir = out / "runs" / run
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def transferkit_overrides(
    root: Path, epochs: int, device: torch.device, cache: bool, cache_dir: Path, augment: bool
) -> list[str]:
    overrides = [
        "data=imagefolder",
        f"data.root={root}",
        "model=efficientnet_lite0",
        f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        f"features.cache={str(cache).lower()}",
        f"features.dir={cache_dir}",
        "callbacks.rich_progress_bar=null",
        "logger=csv",
    ]
    if device.type == "cuda":
        overrides.append("trainer.precision=bf16-mixed")
    if not augment:
        overrides.append("data.augment=false")
    return overrides


def transferkit_run(key: str, name: str, out: Path, overrides: list[str], n_images: int) -> Row:
    """(b)/(c): wall clock around transferkit.tasks.train.train(cfg)."""
    cfg = compose_train(out, key.replace("'", "_prime"), overrides)
    started = time.perf_counter()
    results: dict[str, Any] = train(cfg)
    wall = time.perf_counter() - started
    epochs = int(results["epochs"])
    print(f"{name}: {wall:.1f} s, val/acc {results['val/acc']:.4f}, cache {results.get('feature_cache')}")
    return Row(key, name, wall, epochs * n_images, float(results["val/acc"]), epochs)


class EpochClock(L.Callback):
    """The wall time of each training epoch, its validation included (the (p) rows' unit)."""

    epochs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        EpochClock.epochs.append(time.perf_counter() - self.started)


@dataclass
class PartialRow:
    model: str
    cached: bool
    wall_s: float  # the whole train(cfg) call: building the cache included
    epoch_s: float  # the median epoch, train + val
    val_acc: float
    other_cpu: float | None = None


def partial_run(model: str, cached: bool, out: Path, root: Path, args: Any, cache_dir: Path) -> PartialRow:
    """(p): finetune=partial at augment=false, with or without the prefix cache."""
    overrides = [
        *transferkit_overrides(root, args.partial_epochs, pick_device(args.device), cached, cache_dir, False),
        *PARTIAL_MODELS[model],
        "finetune=partial",
        "+callbacks.epoch_clock._target_=__main__.EpochClock",
    ]
    EpochClock.epochs = []
    run = f"p-{model}-{'cached' if cached else 'uncached'}"
    cfg = compose_train(out, run, overrides)
    started = time.perf_counter()
    results: dict[str, Any] = train(cfg)
    wall = time.perf_counter() - started
    epoch = float(np.median(EpochClock.epochs))
    print(f"{run}: {wall:.1f} s, epoch {epoch:.1f} s, val/acc {results['val/acc']:.4f}")
    return PartialRow(model, cached, wall, epoch, float(results["val/acc"]))


def partial_table(rows: list[PartialRow]) -> str:
    lines = [
        "| model | epoch s, uncached | epoch s, prefix cache | ratio | val acc, uncached | val acc, cached "
        "| wall s, uncached | wall s, cached (build included) | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in PARTIAL_MODELS:
        plain, cached = (next(r for r in rows if r.model == model and r.cached is c) for c in (False, True))
        other = max((r.other_cpu for r in (plain, cached) if r.other_cpu is not None), default=None)
        lines.append(
            f"| {model} | {plain.epoch_s:.1f} | {cached.epoch_s:.1f} | {cached.epoch_s / plain.epoch_s:.2f}x "
            f"| {plain.val_acc:.4f} | {cached.val_acc:.4f} | {plain.wall_s:.1f} | {cached.wall_s:.1f} "
            f"| {'?' if other is None else f'{100 * other:.0f}%'} |"
        )
    return "\n".join(lines)


def partial_targets(rows: list[PartialRow]) -> list[tuple[str, bool, str]]:
    checks = []
    for model in PARTIAL_MODELS:
        plain, cached = (next(r for r in rows if r.model == model and r.cached is c) for c in (False, True))
        ratio, gap = cached.epoch_s / plain.epoch_s, abs(cached.val_acc - plain.val_acc)
        checks += [
            (
                f"(p) {model}: a partial epoch on the prefix cache <= 0.4x uncached",
                ratio <= 0.4,
                f"{ratio:.2f}x",
            ),
            (
                f"(p) {model}: |val acc cached - uncached| <= 0.01 (augment=false)",
                gap <= 0.01 + 1e-9,
                f"{cached.val_acc:.4f} vs {plain.val_acc:.4f}: {gap:.4f}",
            ),
        ]
    return checks


def image_loader(items: list[tuple[Path, int]], backbone: Backbone, pin: bool) -> DataLoader:
    """transferkit's evaluation view: its dataset, transforms, batch size and worker count."""
    dataset = ImageListDataset(items, backbone.preprocessing.transforms(train=False))
    return DataLoader(dataset, batch_size=FLOOR_BATCH, num_workers=default_num_workers(), pin_memory=pin)


def floor_pass(items: list[tuple[Path, int]], device: torch.device, dtype: torch.dtype) -> Row:
    """(d) One inference pass of the backbone over every image, decode included.

    The forward is transferkit's fastest, the runtime a frozen run uses: on a CPU in fp32 its
    onnxruntime session (`transferkit.runtime`, exported before the clock starts), else
    `frozen_forward` (autocast to `dtype`), so that no row can beat the floor by running the
    backbone better. The model is built and warmed up (CUDA context, kernel choice) on one dummy
    batch before the clock starts.
    """
    backbone = build_backbone(MODEL, WEIGHTS)
    model: Callable[[torch.Tensor], torch.Tensor] = backbone.model.eval().to(
        device, memory_format=torch.channels_last
    )
    size = backbone.preprocessing.image_size
    if resolve_runtime("auto", device, dtype) == "onnx":
        with tempfile.TemporaryDirectory() as exports:
            model = session_for(backbone.model, (3, size, size), exports, "The floor's backbone") or model
    with torch.inference_mode():
        dummy = torch.zeros(FLOOR_BATCH, 3, size, size, device=device)
        frozen_forward(model, dummy.contiguous(memory_format=torch.channels_last), dtype)
        sync(device)
        started = time.perf_counter()
        for images, _ in image_loader(items, backbone, pin=device.type == "cuda"):
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            frozen_forward(model, images, dtype)
        sync(device)
    return Row("d", "(d) floor: one inference pass", time.perf_counter() - started, len(items))


def decode_throughput(items: list[tuple[Path, int]]) -> float:
    """Images/s of decoding + evaluation transforms alone (DataLoader, no model)."""
    backbone = build_backbone(MODEL, WEIGHTS)
    started = time.perf_counter()
    for _ in image_loader(items, backbone, pin=False):
        pass
    return len(items) / (time.perf_counter() - started)


# --------------------------------------------------------------------------- the report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine slows every row."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def revision() -> str:
    """The checkout's commit, and whether it had changes: what was measured."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
        )
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine(
    device: torch.device, dtype: torch.dtype, load: tuple[float | None, float | None]
) -> dict[str, str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": f"{cores} usable ({os.cpu_count()} in the machine), torch threads {torch.get_num_threads()}",
        "native bf16": "yes" if native_bf16(device) else "no",
        "torch": torch.__version__,
        "transferkit": f"git {revision()}",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "precision": (
            f"(a) fp32; (b)/(c) trainer {'bf16-mixed' if device.type == 'cuda' else '32-true'}, "
            f"frozen backbone and (d) {str(dtype).removeprefix('torch.')} (features.precision=auto)"
        ),
        "load average (1 min)": f"{load[0]:.2f} at the start, {load[1]:.2f} at the end",
    }
    return info


def table(rows: list[Row], a: Row, d: Row) -> str:
    lines = [
        "| run | wall s | images/s | x faster than (a) | x (d) | val acc | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = f"{r.val_acc:.4f}" if r.val_acc is not None else "-"
        other = f"{100 * r.other_cpu:.0f}%" if r.other_cpu is not None else "?"
        lines.append(
            f"| {r.name} | {r.wall_s:.1f} | {r.images_per_s:.1f} | {a.wall_s / r.wall_s:.2f}x "
            f"| {r.wall_s / d.wall_s:.2f}x | {acc} | {other} |"
        )
    return "\n".join(lines)


def targets(by_key: dict[str, Row]) -> list[tuple[str, bool, str]]:
    a, b, c, d = by_key["a"], by_key["b"], by_key["c"], by_key["d"]
    b0, c0 = by_key["b0"], by_key["c0"]
    per_epoch = (a.wall_s / a.epochs) / (b.wall_s / b.epochs)
    gap = abs(c0.val_acc - b0.val_acc)
    return [
        ("(c) >= 10x faster than (a)", a.wall_s / c.wall_s >= 10, f"{a.wall_s / c.wall_s:.2f}x"),
        ("(c) <= 1.3x (d)", c.wall_s / d.wall_s <= 1.3, f"{c.wall_s / d.wall_s:.2f}x"),
        ("(b) >= 2x faster per epoch than (a)", per_epoch >= 2, f"{per_epoch:.2f}x"),
        (
            "|val acc (c0) - val acc (b0)| <= 0.01 (augment=false)",
            gap <= 0.01 + 1e-9,
            f"{c0.val_acc:.4f} vs {b0.val_acc:.4f}: {gap:.4f}",
        ),
    ]


def report(
    rows: list[Row],
    partial: list[PartialRow],
    info: dict[str, str],
    decode: float | None,
    checks: list[tuple[str, bool, str]],
    args: Any,
) -> str:
    by_key = {r.key: r for r in rows}
    n_val = sum(1 for _ in (Path(args.out) / "data" / "val").rglob("*.jpg"))
    n_all = sum(1 for _ in (Path(args.out) / "data").rglob("*.jpg"))
    epochs = "--only-partial" if args.only_partial else f"--epochs {args.epochs}"
    command = (
        f"`python scripts/benchmark.py {epochs} --partial-epochs {args.partial_epochs} "
        f"--images {args.images} --size {args.size} --device {args.device}`"
    )
    lines = [f"# transferkit benchmark ({info['date']})", "", command + ":"]
    if rows:
        lines += [
            "",
            f"{MODEL} ({WEIGHTS} weights), {args.epochs} epochs, {n_all} images ({n_all - n_val} train, "
            f"{n_val} val) of {args.size} px.",
            "",
            table(rows, by_key["a"], by_key["d"]),
            "",
            f"Decode + evaluation transforms alone: {decode:.1f} images/s ({default_num_workers()} workers).",
            "",
            "images/s: epochs x (train + val images) / wall, for (d) images / wall. x faster than (a): "
            "(a) wall / row wall. x (d): row wall / (d) wall. val acc: the best epoch's (what the tutorial "
            "keeps and transferkit's best checkpoint holds); one val image is "
            f"{100 / max(n_val, 1):.2f} points. "
            "other CPU: the share of the machine's CPU that other processes used while the row ran; "
            "well above 0, that row was slowed down by them.",
        ]
    if partial:
        lines += [
            "",
            f"(p) Fine-tuning the top: finetune=partial (the last block trains), data.augment=false, "
            f"{args.partial_epochs} epochs, {n_all} images ({n_all - n_val} train, {n_val} val) "
            f"of {args.size} px; "
            "uncached against the prefix cache of the activations below the last block.",
            "",
            partial_table(partial),
            "",
            "epoch s: the median epoch, training and validation, from the start of one training epoch to "
            "its end (the cache is built before the first). wall s: the whole run.",
        ]
    lines += [
        "",
        "Machine:",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "Targets:",
        "",
        *[f"- {name}: {'met' if ok else 'NOT met'} ({detail})" for name, ok, detail in checks],
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    return torch.device(choice)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--partial-epochs", type=int, default=3, help="epochs of each (p) run")
    parser.add_argument("--images", type=int, default=480, help="in total, both classes, train + val")
    parser.add_argument("--size", type=int, default=224, help="side of the generated images, in pixels")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, default=Path("/tmp/transferkit-bench"))
    parser.add_argument("--only-partial", action="store_true", help="run the (p) rows alone")
    return parser.parse_args()


def main() -> None:
    if sys.argv[1:2] == ["scale"]:  # the feature cache's scale rows: scripts/benchmark_scale.py
        from benchmark_scale import main as scale

        scale(sys.argv[2:])
        return
    if sys.argv[1:2] == ["runtime"]:  # the frozen backbone's runtime: scripts/benchmark_runtime.py
        from benchmark_runtime import main as runtime

        runtime(sys.argv[2:])
        return
    if sys.argv[1:2] == ["startup"]:  # start-up and predict as whole processes: scripts/benchmark_startup.py
        from benchmark_startup import main as startup

        startup(sys.argv[2:])
        return
    args = parse_args()
    args.out = args.out.resolve()
    load_at_start = load_average()
    device = pick_device(args.device)
    dtype = resolve_precision("auto", device)
    root = generate_dataset(args.out / "data", args.images, args.size)
    train_items, val_items = samples(root)
    items = train_items + val_items
    print(f"Data: {root} ({len(train_items)} train, {len(val_items)} val); device {device}, {dtype}")
    cache_dir = args.out / "cache" / dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")

    rows: list[Row] = []
    decode = None
    if not args.only_partial:
        decode = decode_throughput(items)  # first: it also brings every file into the page cache
        print(f"Decode: {decode:.1f} images/s")
        rows.append(watched(floor_pass, items, device, dtype))
        print(f"(d): {rows[0].wall_s:.1f} s")
        rows.append(watched(tutorial_loop, root, args.epochs, device))
        print(f"(a): {rows[-1].wall_s:.1f} s, val acc {rows[-1].val_acc:.4f}")
        runs = [  # key, name, cache, augment
            ("b", "(b) transferkit, no cache", False, True),
            ("c", "(c) transferkit, cache built", True, True),
            ("c'", "(c') transferkit, cache reused", True, True),
            ("b0", "(b0) no cache, augment=false", False, False),
            ("c0", "(c0) cache, augment=false", True, False),
        ]
        for key, name, cache, augment in runs:
            overrides = transferkit_overrides(root, args.epochs, device, cache, cache_dir, augment)
            rows.append(watched(transferkit_run, key, name, args.out, overrides, len(items)))
        order = ["a", "b", "c", "c'", "b0", "c0", "d"]
        rows.sort(key=lambda r: order.index(r.key))
    partial = [
        watched(partial_run, model, cached, args.out, root, args, cache_dir)
        for model in PARTIAL_MODELS
        for cached in (False, True)
    ]
    checks = ([] if args.only_partial else targets({r.key: r for r in rows})) + partial_targets(partial)
    info = machine(device, dtype, (load_at_start, load_average()))
    text = report(rows, partial, info, decode, checks, args)
    (args.out / "benchmark.md").write_text(text)
    print()
    print(text)
    print(f"Written to {args.out / 'benchmark.md'}")


if __name__ == "__main__":
    main()

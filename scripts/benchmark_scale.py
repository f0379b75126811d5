"""Head epochs on a feature cache of 10k, 100k and 1M rows: `python scripts/benchmark.py scale`.

A million images cannot be extracted here, so each cache is synthetic: random 1280-d features
(EfficientNet-Lite0's width) in fp16 and labels of 100 classes, written in the cache's own format
(`transferkit.features.store`: memory-mapped .npy files and meta.json), plus 1,000 fp32 val rows.
Each size trains in a child process of its own (so its peak memory is its own): the module a run
builds (Lite0's Linear head on the 1280-d features), Lightning's Trainer with a CSV logger and
checkpoints, and the loaders a cached run uses (`features.loading`: whole batches sliced from
the memory map, in EpochSampler's order, at the head batch `features.batch_size=4096` gives).
Two epochs by default (`--epochs`): the first reads the file from disk (unless the page cache
holds it), the last is the steady state. Peak memory is the child's RSS high-water mark (VmHWM;
the mapped pages it touched count). Targets: time linear in rows, a 1M-row epoch within 20 s,
peak memory under the cache's size + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SIZES = (10_000, 100_000, 1_000_000)
WIDTH, CLASSES, VAL_ROWS, CHUNK = 1280, 100, 1_000, 65_536
DATA_BATCH_SIZE, FEATURES_BATCH_SIZE = 32, 4096  # conf/data's usual batch, conf/features' default


def write_cache(directory: Path, rows: int, seed: int = 0) -> Path:
    """A synthetic cache of `rows` training rows in the cache's format (reused when complete)."""
    from transferkit.features import store

    final = directory / f"synthetic-{rows}"
    if store.read_meta(final, f"synthetic-{rows}") is not None:
        return final
    tmp = store.temporary_dir(final)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for split, n, dtype in (("train", rows, torch.float16), ("val", VAL_ROWS, torch.float32)):
        shard = store.Shard(store.features_file(tmp, split), 1, n)
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            shard.write(0, start, torch.rand(count, WIDTH, generator=g).to(dtype))
        shard.close()
        store.write_labels(tmp, split, torch.randint(CLASSES, (n,), generator=g))
    store.publish(tmp, final, f"synthetic-{rows}", ["train", "val"])
    return final


def peak_rss() -> int:
    """This process's RSS high-water mark in bytes (VmHWM: unlike getrusage's ru_maxrss, it does
    not inherit the parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_child(cache: Path, rows: int, out: Path, epochs: int) -> dict[str, Any]:
    """`epochs` head epochs on the cache, as a cached run trains (in this process)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from transferkit.data.sampling import EpochSampler
    from transferkit.features import FeatureSet, store
    from transferkit.features.loading import feature_loader, head_batch_size
    from transferkit.model.module import TransferModule

    rss_start = peak_rss()
    meta = store.read_meta(cache, f"synthetic-{rows}")
    sets = {split: FeatureSet(*store.open_split(cache, split, meta)) for split in ("train", "val")}
    batch = head_batch_size(rows, DATA_BATCH_SIZE, FEATURES_BATCH_SIZE)

    class CachedData(L.LightningDataModule):
        def train_dataloader(self):
            return feature_loader(sets["train"], EpochSampler(rows, 42), batch)

        def val_dataloader(self):
            return feature_loader(sets["val"], None, batch)

    class EpochClock(L.Callback):
        def __init__(self) -> None:
            self.train_s: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.train_s.append(time.perf_counter() - self.started)

    torch.manual_seed(0)
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1e-3, "momentum": 0.9}  # optimizer=sgd
    model = TransferModule("timm:tf_efficientnet_lite0", [str(c) for c in range(CLASSES)], optimizer=sgd)
    model.backbone.requires_grad_(False)
    clock = EpochClock()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=CSVLogger(out, name=f"rows{rows}"),
        callbacks=[clock, ModelCheckpoint(dirpath=out / f"rows{rows}" / "checkpoints", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=CachedData())
    return {
        "rows": rows,
        "batch": batch,
        "steps": trainer.global_step // epochs,
        "epoch_s": clock.train_s,
        "fit_s": time.perf_counter() - started,
        "rss_start": rss_start,
        "rss_peak": peak_rss(),
        "cache_bytes": sum(p.stat().st_size for p in cache.iterdir()),
        "val_acc": float(trainer.callback_metrics["val/acc"]),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| rows | head batch | steps/epoch | epoch 1 (cold) s | last epoch s | µs/row (last epoch) "
        "| peak RSS | cache | RSS - cache |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['batch']} | {r['steps']} | {r['epoch_s'][0]:.2f} | {r['epoch_s'][-1]:.2f} "
            f"| {1e6 * r['epoch_s'][-1] / r['rows']:.1f} | {r['rss_peak'] / 1e9:.2f} GB "
            f"| {r['cache_bytes'] / 1e9:.2f} GB | {(r['rss_peak'] - r['cache_bytes']) / 1e9:.2f} GB |"
        )
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    by_rows = {r["rows"]: r for r in results}
    checks = []
    if 1_000_000 in by_rows:
        big = by_rows[1_000_000]
        epoch = max(big["epoch_s"])
        checks.append(
            f"1M-row epoch <= 20 s: {'yes' if epoch <= 20 else 'NO'} ({epoch:.1f} s, the slower epoch)"
        )
    for r in results:
        over = (r["rss_peak"] - r["cache_bytes"]) / 1e9
        checks.append(
            f"{r['rows']:,} rows: peak memory < cache + 1 GB: {'yes' if over < 1 else 'NO'} (+{over:.2f} GB)"
        )
    if len(results) > 1:
        per_row = [r["epoch_s"][-1] / r["rows"] for r in results]
        checks.append(
            "time per row, smallest to largest cache: "
            + ", ".join(f"{1e6 * p:.1f} µs" for p in per_row)
            + " (linear: flat or falling)"
        )
    return checks


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", type=Path, default=Path("/tmp/transferkit-bench/scale"))
    parser.add_argument("--epochs", type=int, default=2, help="per size: the first reads the disk")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # rows, in the child process
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.child:
        cache = args.out / "caches" / f"synthetic-{args.child}"
        print(json.dumps(train_child(cache, args.child, args.out / "runs", args.epochs)))
        return
    results = []
    for rows in args.rows:
        started = time.perf_counter()
        write_cache(args.out / "caches", rows)
        print(f"{rows:,} rows: cache ready in {time.perf_counter() - started:.1f} s", flush=True)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(rows),
                "--out",
                str(args.out),
                "--epochs",
                str(args.epochs),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise SystemExit(f"{rows} rows: the training child failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{rows:,} rows: {json.dumps(results[-1])}", flush=True)
    load = os.getloadavg()[0]
    text = "\n".join([table(results), "", *(f"- {c}" for c in targets(results))])
    text += f"\n\ntorch threads {torch.get_num_threads()}, load average {load:.2f} at the end\n"
    (args.out / "scale.md").write_text(text)
    print(text)
    print(f"Written to {args.out / 'scale.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])

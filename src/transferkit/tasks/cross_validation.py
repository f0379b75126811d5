"""Cross-validation in one command (`data.folds=K`): one model per fold, each a whole training
run in `<run>/folds/<i>/`, then the mean and standard deviation of every metric over the folds
and every training image's out-of-fold probabilities (`oof.csv`). `ckpt_path=last` resumes it:
finished folds are read back, the interrupted one resumes from its last.ckpt. A finished fold
whose recorded files (`transferkit.data.digests`) are not its files now is refused: an image
added since that hashes into it would be held out by no fold, and the mean would mix two
versions of the data.

The folds run one after another in this process, on one device (several: sweep `data.fold`).

With a frozen backbone (or prefix) every fold reads one feature cache: it holds the whole pool,
and each fold takes its rows (`features.frozen`).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, open_dict
from rich import get_console
from rich.table import Table
from torch.utils.data import DataLoader

from transferkit.config.build import build
from transferkit.data.digests import changed_splits, describe_changes
from transferkit.errors import ConfigError
from transferkit.runs.checkpoints import recorded_seed, recorded_splits
from transferkit.runs.directories import move_into_run, write_json
from transferkit.tasks.preflight import resolve_seed

if TYPE_CHECKING:
    from transferkit.tasks.run import TrainingRun

log = logging.getLogger(__name__)
OOF = "oof.csv"
TrainOnce = Callable[[DictConfig, bool], "tuple[dict[str, Any], TrainingRun]"]


def fold_config(cfg: DictConfig, fold: int) -> DictConfig:
    """The run's config for fold `fold`: that fold's data, in `<run>/folds/<fold>`."""
    fold_cfg = copy.deepcopy(cfg)
    with open_dict(fold_cfg):
        fold_cfg.data.fold = fold
        fold_cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / "folds" / str(fold))
    Path(fold_cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    return fold_cfg


@torch.no_grad()
def held_out_probabilities(run: TrainingRun) -> torch.Tensor:
    """The best checkpoint's probabilities (softmax, or multi-label sigmoids) for the fold's
    held-out images, in their order, from what training validated on (cached features or images)."""
    model, datamodule = run.model, run.datamodule
    cached = (datamodule.feature_sets or {}).get("val")
    dataset = cached if cached is not None else datamodule.datasets["val"]
    workers = 0 if cached is not None else datamodule.num_workers
    loader = DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=workers)
    model.eval()
    logits = torch.cat([model.logits(inputs.to(model.device)).float().cpu() for inputs, _ in loader])
    return logits.sigmoid() if model.multilabel else logits.softmax(dim=1)


def _label_text(label: Any, class_names: list[str]) -> str:
    if isinstance(label, tuple):
        return ";".join(name for name, on in zip(class_names, label, strict=True) if on)
    return class_names[label]


def write_out_of_fold(path: Path, rows: list[list[str]], class_names: list[str]) -> None:
    """oof.csv: path, fold, label, then each class's probability, in the pool's order."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "fold", "label", *(f"prob:{name}" for name in class_names)])
        writer.writerows(sorted(rows))


def summarise(per_fold: list[dict[str, Any]], primary: str) -> dict[str, Any]:
    """Every metric's mean over the folds (`val/acc`) and sample standard deviation
    (`val/acc_std`), the run's metric first, then each fold's values (`fold_metrics`)."""
    names = [k for k, v in per_fold[0].items() if isinstance(v, float) and "/" in k]
    names.sort(key=lambda name: name != primary)
    summary: dict[str, Any] = {}
    for name in names:
        values = [fold[name] for fold in per_fold]
        summary[name] = statistics.fmean(values)
        summary[f"{name}_std"] = statistics.stdev(values)
    summary["fold_metrics"] = {name: [round(fold[name], 6) for fold in per_fold] for name in names}
    return summary


def print_folds(summary: dict[str, Any], folds: int) -> None:
    """Each metric per fold, and its mean ± std."""
    table = Table(title=f"Cross-validation ({folds} folds)", title_justify="left")
    table.add_column("metric", no_wrap=True)
    for fold in range(folds):
        table.add_column(f"fold {fold}", justify="right")
    table.add_column("mean ± std", justify="right")
    for name, values in summary["fold_metrics"].items():
        spread = f"{summary[name]:.4f} ± {summary[f'{name}_std']:.4f}"
        table.add_row(name, *(f"{v:.4f}" for v in values), spread)
    get_console().print(table)


def refuse_several_devices(cfg: DictConfig) -> None:
    """The folds run one after another in this process; DDP launches its processes for one fit."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1) or 1
    one = devices in (1, "1") or (
        isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1
    )
    if not one or int(nodes) > 1:
        raise ConfigError(
            f"data.folds without data.fold trains the folds one after another on one device "
            f"(trainer.devices={devices}); on several, sweep the folds, each job on its devices: "
            f"python train.py -m data.folds={cfg.data.folds} data.fold=0,...,{int(cfg.data.folds) - 1} seed=N"
        )


def resume_run(cfg: DictConfig) -> None:
    """`ckpt_path=last` continues a cross-validation: this run directory's (hydra.run.dir=<run>),
    else the newest under logs/train/runs that has folds/. Its seed is the run's own."""
    if cfg.ckpt_path != "last":
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a cross-validation (data.folds without data.fold) resumes "
            "with ckpt_path=last (hydra.run.dir=<run> names the run); it goes on where it stopped."
        )
    own = Path(cfg.paths.output_dir)
    runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    runs_with_folds = (p.parent for p in runs.glob("*/folds") if p.is_dir())
    found = [own] if (own / "folds").is_dir() else sorted(runs_with_folds, key=os.path.getmtime)
    if not found:
        raise ConfigError(f"ckpt_path=last: no cross-validation run in {runs} (none has folds/).")
    run_dir = found[-1].resolve()
    if run_dir != own.resolve():
        move_into_run(own, run_dir)
    seeds = [recorded_seed(p) for p in sorted(run_dir.glob("folds/*/checkpoints/last.ckpt"))]
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.ckpt_path = None
        cfg.seed = next((seed for seed in seeds if seed is not None), cfg.seed)


def is_finished(fold_dir: Path) -> bool:
    """A fold is done once its results.json is written (last)."""
    return (fold_dir / "results.json").is_file()


def fold_record(fold_dir: Path) -> dict[str, Any] | None:
    """The files a fold's run recorded: its last.ckpt's, else another of its checkpoints' (None
    when none records them: checkpoints that predate the record are not compared)."""
    checkpoints = fold_dir / "checkpoints"
    for path in [checkpoints / "last.ckpt", *sorted(checkpoints.glob("*.ckpt"))]:
        recorded = recorded_splits(path) if path.is_file() else None
        if recorded:
            return recorded
    return None


def refuse_finished_folds_on_other_files(cfg: DictConfig) -> None:
    """Refuse, before any fold trains, to keep a finished fold trained or measured on other files
    than the data gives it now: an image added since that hashes into it is held out by no fold
    (missing from oof.csv), and its results would be averaged with folds cut from other data."""
    folds = int(cfg.data.folds)
    for fold in range(folds):
        fold_dir = Path(cfg.paths.output_dir) / "folds" / str(fold)
        recorded = fold_record(fold_dir) if is_finished(fold_dir) else None
        if not recorded:
            continue
        datamodule = build(fold_config(cfg, fold).data)
        datamodule.prepare_data()
        changes = changed_splits(recorded, datamodule.split_digests())
        if changes:
            raise ConfigError(
                f"Fold {fold} of {folds} finished on other files than it holds now "
                f"({describe_changes(changes)}: files were added, removed or renamed under "
                f"{datamodule.root}), so its results cannot be kept beside folds cut from the data "
                "now; restore the files the run had, or start a new cross-validation (without "
                "ckpt_path=last)."
            )


def run_fold(cfg: DictConfig, fold: int, train_once: TrainOnce) -> tuple[dict[str, Any], list[list[str]]]:
    """Fold `fold`'s results and out-of-fold rows: read back when a resumed run finished it (its
    results.json is written last), else trained, from its last.ckpt when it has one."""
    fold_cfg = fold_config(cfg, fold)
    fold_dir = Path(fold_cfg.paths.output_dir)
    if is_finished(fold_dir):
        log.info("Cross-validation: fold %d of %d was done; its results are kept.", fold + 1, cfg.data.folds)
        with (fold_dir / OOF).open(newline="") as handle:
            return json.loads((fold_dir / "results.json").read_text()), list(csv.reader(handle))[1:]
    log.info("Cross-validation: fold %d of %d", fold + 1, cfg.data.folds)
    last = fold_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        with open_dict(fold_cfg):
            fold_cfg.ckpt_path = str(last)
    results, run = train_once(fold_cfg, fold == 0)  # the config tree once
    rows = write_held_out(run, fold_dir)
    write_json(fold_dir / "results.json", results)
    return results, rows


def write_held_out(run: TrainingRun, directory: Path) -> list[list[str]]:
    """A fold's oof.csv (its held-out images' probabilities) in `directory`; returns its rows."""
    probs, names, fold = held_out_probabilities(run), run.model.class_names, run.cfg.data.fold
    rows = [
        [str(path), str(fold), _label_text(label, names), *(f"{x:.6f}" for x in p)]
        for (path, label), p in zip(run.datamodule.splits.val, probs.tolist(), strict=True)
    ]
    write_out_of_fold(directory / OOF, rows, names)
    return rows


def cross_validate(cfg: DictConfig, train_once: TrainOnce) -> dict[str, Any]:
    """Train every fold in turn (a resumed run: those not done); returns the summary results.json
    holds."""
    refuse_several_devices(cfg)
    if cfg.get("ckpt_path"):
        resume_run(cfg)
    with open_dict(cfg):  # once: every fold cuts the same pool the same way
        cfg.seed = resolve_seed(cfg.get("seed"), cfg.get("ckpt_path"))
    refuse_finished_folds_on_other_files(cfg)
    folds, output = int(cfg.data.folds), Path(cfg.paths.output_dir)
    per_fold, rows = [], []
    for fold in range(folds):
        results, fold_rows = run_fold(cfg, fold, train_once)
        per_fold.append(results)
        rows += fold_rows
    summary = summarise(per_fold, next(iter(per_fold[0])))  # results lead with the run's metric
    print_folds(summary, folds)
    class_names = per_fold[0]["class_names"]
    write_out_of_fold(output / OOF, rows, class_names)
    return {
        **summary,
        "folds": folds,
        "fold_dirs": [str((output / "folds" / str(fold)).resolve()) for fold in range(folds)],
        "oof": str((output / OOF).resolve()),
        "class_names": class_names,
        "seed": cfg.seed,
        "feature_cache": per_fold[-1].get("feature_cache"),
        "epochs": [fold["epochs"] for fold in per_fold],
    }

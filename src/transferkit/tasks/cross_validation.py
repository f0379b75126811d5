"""Cross-validation in one command (`data.folds=K`): one model per fold, each a whole training
run in `<run>/folds/<i>/`, then the mean and standard deviation of every metric over the folds
and every training image's out-of-fold probabilities (`oof.csv`).

With a frozen backbone (or prefix) every fold reads one feature cache: it holds the whole pool,
and each fold takes its rows (`features.frozen`).
"""

from __future__ import annotations

import copy
import csv
import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict
from rich import get_console
from rich.table import Table
from torch.utils.data import DataLoader

from transferkit.errors import ConfigError
from transferkit.run_dirs import write_json

if TYPE_CHECKING:
    from transferkit.tasks.train import TrainingRun

log = logging.getLogger(__name__)
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


@rank_zero_only
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


@rank_zero_only
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


def cross_validate(cfg: DictConfig, train_once: TrainOnce) -> dict[str, Any]:
    """Train every fold in turn; returns the summary results.json holds."""
    refuse_several_devices(cfg)
    if cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path cannot resume a whole cross-validation (data.folds without data.fold); resume "
            "the interrupted fold on its own: data.fold=I ckpt_path=<run>/folds/I/checkpoints/last.ckpt."
        )
    folds, output = int(cfg.data.folds), Path(cfg.paths.output_dir)
    per_fold, rows, last = [], [], None
    for fold in range(folds):
        log.info("Cross-validation: fold %d of %d", fold + 1, folds)
        fold_cfg = fold_config(cfg, fold)
        results, run = train_once(fold_cfg, fold == 0)  # the config tree once
        rank_zero_only(write_json)(Path(fold_cfg.paths.output_dir) / "results.json", results)
        per_fold.append(results)
        if run.trainer.is_global_zero:
            probs = held_out_probabilities(run)
            names = run.model.class_names
            for (path, label), p in zip(run.datamodule.splits.val, probs.tolist(), strict=True):
                rows.append([str(path), str(fold), _label_text(label, names), *(f"{x:.6f}" for x in p)])
        last = run
    summary = summarise(per_fold, last.model.primary_metric)
    print_folds(summary, folds)
    write_out_of_fold(output / "oof.csv", rows, last.model.class_names)
    return {
        **summary,
        "folds": folds,
        "fold_dirs": [str((output / "folds" / str(fold)).resolve()) for fold in range(folds)],
        "oof": str((output / "oof.csv").resolve()),
        "class_names": last.model.class_names,
        "seed": cfg.seed,
        "feature_cache": per_fold[-1].get("feature_cache"),
        "epochs": [fold["epochs"] for fold in per_fold],
    }

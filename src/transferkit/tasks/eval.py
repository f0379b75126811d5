"""The eval task: a checkpoint's metrics on a split, a confusion matrix, a per-class report and
its most confident mistakes.

A multi-label checkpoint is measured at its own thresholds (mean average precision first, then
AUROC and micro and macro F1) and gets the multi-label per-class report only: with several true
and predicted labels per image there is no confusion matrix and no one "mistake" per image
(see transferkit.reports.multilabel).

The checkpoint records each split's files and how its val was made (`transferkit.data.digests`).
When the data no longer gives them, eval says so in one line, and refuses a val split whose files
changed when the seed cut it, in the run or now: a val/ folder made since from train/, or a val
cut now from a train/ that gained the run's val images, may hold images the run trained on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from transferkit import reports
from transferkit.config.build import recorded_datamodule
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.digests import changed_splits, describe_changes
from transferkit.errors import ConfigError, DataError
from transferkit.features.precision import precision_name
from transferkit.inference import Predictions, load_predictor, predict_files
from transferkit.model.metrics import classification_metrics
from transferkit.model.module import TransferModule
from transferkit.model.multilabel import multilabel_scores
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.settings import check_config
from transferkit.tasks.wrapper import exit_on_user_error, task_wrapper

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def choose_split(split: str | None, datamodule: ImageFolderDataModule) -> str:
    if split is None:
        return "test" if datamodule.has_test else "val"
    if split not in SPLITS or (split == "test" and not datamodule.has_test):
        have = [s for s in SPLITS if s != "test" or datamodule.has_test]
        raise ConfigError(f"split={split} is not in the data; choose one of: {', '.join(have)}.")
    return split


def check_same_classes(model: TransferModule, data_classes: list[str]) -> None:
    if model.class_names != list(data_classes):
        raise DataError(
            f"The checkpoint was trained on classes {model.class_names}, the data has {list(data_classes)}; "
            "evaluate it on data with the same class folders."
        )


def check_same_kind(model: TransferModule, data_multilabel: bool) -> None:
    if model.multilabel and not data_multilabel:
        raise DataError(
            "The checkpoint is a multi-label model and the data is single-label; evaluate it on "
            "multi-label data (data=csv data.multilabel=true data.labels=PATH)."
        )
    if data_multilabel and not model.multilabel:
        raise DataError(
            "The checkpoint is a single-label model and the data is multi-label; evaluate it on "
            "data with one label per image."
        )


def check_recorded_files(
    recorded: dict[str, Any] | None, datamodule: ImageFolderDataModule, split: str
) -> None:
    """Say in one line when the data's files are not the run's (checkpoints that predate the
    record are not compared). A changed val is refused where the seed cut it, in the run or now
    (`may_hold_trained_images`): only the run's own val is known never to have been trained on."""
    if not recorded:
        return
    current = datamodule.split_digests()
    changes = changed_splits(recorded, current)
    if not changes:
        return
    if split == "val" and "val" in {c.split for c in changes} and may_hold_trained_images(recorded, current):
        test = ", evaluate split=test" if datamodule.has_test else ""
        raise DataError(
            f"The data changed since the run ({describe_changes(changes)}), so this val split is not the "
            f"one the run held out and may hold images it trained on; restore the files the run "
            f"had{test}, or train again."
        )
    kept = "scored as it is now" if split in {c.split for c in changes} else "the run's own"
    log.warning(
        "The data changed since the run (%s); the %s split is %s.", describe_changes(changes), split, kept
    )


def may_hold_trained_images(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a val that changed since the run may hold images it trained on: when the run cut
    its val by the seed (its training files are wherever the user put them since, a new val/
    folder included), or the seed cuts it now (from a train split that may hold them). Only a
    val/ folder (or val rows) then and now holds none but what the user put there. A record
    without `val_from` (the first digests) is read as the data is now."""
    return "seed" in {recorded.get("val_from", current["val_from"]), current["val_from"]}


def refuse_unreadable(predictions: Predictions, split: str) -> None:
    failed = [(p, e) for p, e in zip(predictions.paths, predictions.errors, strict=True) if e is not None]
    if failed:
        listed = "; ".join(f"{p} ({e})" for p, e in failed[:20])
        raise DataError(
            f"{len(failed)} image(s) of {split} cannot be read: {listed}. Remove or replace them."
        )


def write_reports(
    model: TransferModule, predictions: Predictions, labels: torch.Tensor, split: str, cfg: DictConfig
) -> int:
    """confusion_matrix.*, per_class.csv (also printed) and misclassified.png in the run
    directory; returns how many mistakes the grid shows."""
    output_dir = Path(cfg.paths.output_dir)
    matrix = reports.confusion_matrix(labels, predictions.logits.argmax(1), len(model.class_names))
    reports.write_confusion_matrix(matrix, model.class_names, output_dir)
    rows = reports.per_class_report(matrix, model.class_names)
    reports.write_per_class_report(rows, output_dir / "per_class.csv")
    reports.print_per_class_report(rows, title=f"Per-class report ({split})")
    return reports.write_misclassified_grid(
        predictions.paths,
        labels,
        predictions.probs,
        model.class_names,
        output_dir / "misclassified.png",
        count=int(cfg.misclassified),
    )


def single_label_results(
    model: TransferModule, predictions: Predictions, labels: torch.Tensor, split: str, cfg: DictConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, details): loss, accuracy and the rest as training logs them; the mistakes."""
    logits = predictions.logits
    metrics = classification_metrics(len(model.class_names), f"{split}/")
    values = {f"{split}/loss": model.criterion(logits, labels), **metrics(logits, labels)}
    shown = write_reports(model, predictions, labels, split, cfg)
    details = {"misclassified": int((logits.argmax(1) != labels).sum()), "misclassified_shown": shown}
    return {k: float(v) for k, v in values.items()}, details


def multilabel_results(
    model: TransferModule, predictions: Predictions, targets: torch.Tensor, split: str, output_dir: Path
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, details) at the checkpoint's thresholds: map, auroc, f1_micro, f1_macro and the
    BCE loss; the thresholds and the classes no image has. Writes and prints per_class.csv."""
    thresholds = model.thresholds.detach().float().cpu()
    probs = predictions.probs
    values = {
        **multilabel_scores(probs, targets, thresholds, prefix=f"{split}/"),
        f"{split}/loss": model.criterion(predictions.logits, targets.float()),
    }
    rows = reports.multilabel_report(probs, targets, thresholds, model.class_names)
    reports.write_multilabel_report(rows, output_dir / "per_class.csv")
    reports.print_multilabel_report(rows, title=f"Per-class report ({split})")
    details = {
        "thresholds": thresholds.tolist(),
        "classes_without_positives": reports.without_positives(rows),
    }
    return {k: float(v) for k, v in values.items()}, details


@task_wrapper("Evaluation ({cfg.paths.output_dir})")
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Measure the checkpoint on the split and write the reports to the run directory."""
    model = load_model(cfg.ckpt_path)
    datamodule = recorded_datamodule(cfg.get("data"), model.data_config)
    datamodule.prepare_data()
    check_same_classes(model, datamodule.class_names)
    split = choose_split(cfg.get("split"), datamodule)
    check_same_kind(model, datamodule.splits.multilabel)
    check_recorded_files(model.run_record.get("splits"), datamodule, split)
    items = getattr(datamodule.splits, split)
    predictor = load_predictor(
        cfg.ckpt_path, cfg.device, cfg.get("precision"), cfg.runtime, cfg.runtime_dir, model=model
    )
    workers = datamodule.num_workers if cfg.get("num_workers") is None else int(cfg.num_workers)
    predictions = predict_files(
        predictor,
        [p for p, _ in items],
        int(cfg.batch_size),
        workers,
        description=f"Evaluating {split}",
    )
    refuse_unreadable(predictions, split)

    labels = torch.tensor([label for _, label in items])  # (N,) class indices, or (N, C) 0/1
    if model.multilabel:
        metrics, details = multilabel_results(model, predictions, labels, split, Path(cfg.paths.output_dir))
    else:
        metrics, details = single_label_results(model, predictions, labels, split, cfg)
    return {
        **metrics,
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "split": split,
        "data_root": str(Path(datamodule.root).resolve()),
        "images": len(items),
        **details,
        "precision": precision_name(predictor.dtype),
        "device": str(predictor.device),
        "runtime": predictor.runtime,
        "class_names": model.class_names,
    }


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    evaluate(cfg)

"""The eval task: a checkpoint's metrics on a split, a confusion matrix, a per-class report and
its most confident mistakes."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from transferkit import reports
from transferkit.checkpoints import load_model
from transferkit.errors import ConfigError, DataError
from transferkit.features.precision import PRECISIONS, checkpoint_precision
from transferkit.inference import TorchPredictor, best_device, predict_files
from transferkit.module import classification_metrics
from transferkit.tasks.common import (
    build,
    check_same_classes,
    plain,
    print_results,
    user_errors_exit,
    write_json,
)

log = logging.getLogger("transferkit")
SPLITS = ("train", "val", "test")


def eval_datamodule(data: DictConfig | None, recorded: dict[str, Any] | None) -> Any:
    """The data config given (one with a `_target_`), else the checkpoint's own data with the
    keys given here (data.root=...) laid over it."""
    given = plain(data) or {}
    if "_target_" in given:
        return build(data)
    if not recorded:
        raise ConfigError(
            "The checkpoint does not record its data; name it: data=imagefolder data.root=PATH."
        )
    merged = {**recorded, **{k: v for k, v in given.items() if v is not None}}
    return build(OmegaConf.create(merged))


def choose_split(split: str | None, datamodule: Any) -> str:
    if split is None:
        return "test" if datamodule.has_test else "val"
    if split not in SPLITS or (split == "test" and not datamodule.has_test):
        have = [s for s in SPLITS if s != "test" or datamodule.has_test]
        raise ConfigError(f"split={split} is not in the data; choose one of: {', '.join(have)}.")
    return split


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Write results.json and the reports to the run directory; return the results."""
    started = time.perf_counter()
    model = load_model(cfg.ckpt_path)
    datamodule = eval_datamodule(cfg.get("data"), model.data_config)
    datamodule.prepare_data()
    check_same_classes(model, datamodule.class_names)
    split = choose_split(cfg.get("split"), datamodule)
    items = getattr(datamodule.splits, split)
    device = best_device(cfg.device)
    dtype = checkpoint_precision(cfg.get("precision"), model.frozen_dtype, device)
    predictor = TorchPredictor(model, device, dtype)
    workers = datamodule.num_workers if cfg.get("num_workers") is None else int(cfg.num_workers)
    predictions = predict_files(
        predictor, [p for p, _ in items], int(cfg.batch_size), workers, description=f"Evaluating {split}"
    )
    failed = [(p, e) for p, e in zip(predictions.paths, predictions.errors, strict=True) if e is not None]
    if failed:
        listed = "; ".join(f"{p} ({e})" for p, e in failed[:20])
        raise DataError(
            f"{len(failed)} image(s) of {split} cannot be read: {listed}. Remove or replace them."
        )

    labels = torch.tensor([label for _, label in items])
    logits = predictions.logits
    metrics = classification_metrics(len(model.class_names), f"{split}/")
    values = {f"{split}/loss": model.criterion(logits, labels), **metrics(logits, labels)}
    results: dict[str, Any] = {k: float(v) for k, v in values.items()}

    output_dir = Path(cfg.paths.output_dir)
    matrix = reports.confusion_matrix(labels, logits.argmax(1), len(model.class_names))
    reports.write_confusion_matrix(matrix, model.class_names, output_dir)
    rows = reports.per_class_report(matrix, model.class_names)
    reports.write_per_class_report(rows, output_dir / "per_class.csv")
    reports.print_per_class_report(rows, title=f"Per-class report ({split})")
    shown = reports.write_misclassified_grid(
        predictions.paths,
        labels,
        predictions.probs,
        model.class_names,
        output_dir / "misclassified.png",
        count=int(cfg.misclassified),
    )
    results.update(
        checkpoint=str(Path(cfg.ckpt_path).resolve()),
        split=split,
        data_root=str(Path(datamodule.root).resolve()),
        images=len(items),
        misclassified=int((logits.argmax(1) != labels).sum()),
        misclassified_shown=shown,
        precision=next(name for name, d in PRECISIONS.items() if d == dtype),
        device=str(device),
        class_names=model.class_names,
        wall_s=round(time.perf_counter() - started, 2),
    )
    write_json(output_dir / "results.json", results)
    print_results(f"Evaluation ({output_dir})", results)
    return results


@user_errors_exit
def main(cfg: DictConfig) -> None:
    evaluate(cfg)

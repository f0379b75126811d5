"""The predict task: classify images with a checkpoint or an exported model.onnx, into a CSV.

A single-label model's row is the label, its confidence and the top-k; a multi-label model's
is every label whose score reaches its class's threshold, then every class's score (top_k does
not apply to it)."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from transferkit.data.workers import default_num_workers
from transferkit.errors import ConfigError
from transferkit.inference import Predictions, collect_inputs, load_predictor, predict_files
from transferkit.model.decisions import decide
from transferkit.tasks.settings import check_config
from transferkit.tasks.wrapper import exit_on_user_error, task_wrapper

log = logging.getLogger(__name__)


def csv_header(top_k: int) -> list[str]:
    ranked = [f"top{r}_{what}" for r in range(1, top_k + 1) for what in ("label", "prob")]
    return ["path", "label", "confidence", *ranked, "error"]


def write_predictions(path: Path, predictions: Predictions, class_names: list[str], top_k: int) -> None:
    """One row per file: its label and confidence, then the top-k; a failed file has its error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = predictions.probs
    top_p, top_i = probs.topk(top_k, dim=1)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_header(top_k))
        for row, (file, error) in enumerate(zip(predictions.paths, predictions.errors, strict=True)):
            if error is not None:
                writer.writerow([str(file), "", "", *[""] * (2 * top_k), error])
                continue
            pairs = zip(top_i[row].tolist(), top_p[row].tolist(), strict=True)
            ranked = [v for i, p in pairs for v in (class_names[i], f"{p:.6f}")]
            writer.writerow([str(file), ranked[0], ranked[1], *ranked, ""])


LABEL_SEPARATOR = ";"  # as in label files
SCORE_PREFIX = "score:"  # a multi-label CSV's score columns: score:<class>, never a class name alone


def multilabel_csv_header(class_names: list[str]) -> list[str]:
    return ["path", "labels", *[f"{SCORE_PREFIX}{name}" for name in class_names], "error"]


def write_multilabel_predictions(
    path: Path, predictions: Predictions, class_names: list[str], thresholds: torch.Tensor
) -> None:
    """One row per file: the labels at or above their thresholds joined by ';' (empty: none),
    then every class's sigmoid; a failed file has its error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = predictions.probs
    chosen = decide(probs, thresholds)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(multilabel_csv_header(class_names))
        for row, (file, error) in enumerate(zip(predictions.paths, predictions.errors, strict=True)):
            if error is not None:
                writer.writerow([str(file), "", *[""] * len(class_names), error])
                continue
            labels = [name for name, on in zip(class_names, chosen[row].tolist(), strict=True) if on]
            scores = [f"{p:.6f}" for p in probs[row].tolist()]
            writer.writerow([str(file), LABEL_SEPARATOR.join(labels), *scores, ""])


def label_summary(
    predictions: Predictions, class_names: list[str], thresholds: torch.Tensor | None
) -> dict[str, Any]:
    """`labels`: how often each class was predicted over the files read, the top label of each
    file; with multi-label `thresholds` every label of each, and `without_label`: the files
    given none."""
    ok = predictions.ok
    if thresholds is None:
        counts = Counter(class_names[i] for i in predictions.logits[ok].argmax(1).tolist())
        return {"labels": dict(sorted(counts.items()))}
    chosen = decide(predictions.probs[ok], thresholds)
    counts = {name: n for name, n in zip(class_names, chosen.sum(0).tolist(), strict=True) if n}
    return {"labels": dict(sorted(counts.items())), "without_label": int((chosen.sum(1) == 0).sum())}


@task_wrapper("Predictions")
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Write the CSV named by `output`; returns the summary (results.json in the run directory)."""
    top_k = int(cfg.top_k)
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be 1 or more.")
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be 1 or more.")
    predictor = load_predictor(cfg.ckpt_path, cfg.device, cfg.precision, cfg.runtime, cfg.runtime_dir)
    paths = collect_inputs(cfg.input)
    if top_k > len(predictor.class_names) and not predictor.multilabel:
        log.warning("top_k=%d, but the model has %d classes; listing all.", top_k, len(predictor.class_names))
        top_k = len(predictor.class_names)
    workers = default_num_workers() if cfg.get("num_workers") is None else int(cfg.num_workers)
    predictions = predict_files(predictor, paths, int(cfg.batch_size), workers, tta=bool(cfg.tta))
    output = Path(cfg.output)
    if predictor.multilabel:
        write_multilabel_predictions(output, predictions, predictor.class_names, predictor.thresholds)
    else:
        write_predictions(output, predictions, predictor.class_names, top_k)

    failed = [str(p) for p, e in zip(predictions.paths, predictions.errors, strict=True) if e is not None]
    if failed:
        log.warning(
            "%d file(s) could not be read (their rows say why): %s", len(failed), ", ".join(failed[:20])
        )
    return {
        "output": str(output.resolve()),
        "model": str(Path(cfg.ckpt_path).resolve()),
        "files": len(paths),
        "predicted": int(predictions.ok.sum()),
        "failed": len(failed),
        **label_summary(predictions, predictor.class_names, predictor.thresholds),
        "tta": bool(cfg.tta),
        "device": str(predictor.device),
        "runtime": predictor.runtime,
        **({"multilabel": True} if predictor.multilabel else {}),
    }


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    predict(cfg)

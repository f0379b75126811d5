"""A train.py checkpoint read as a file: its dict (torch.load with weights_only, no Lightning),
its hyper-parameters and record naming today's module paths, and a digest of its bytes.

Predict and serve apply a checkpoint from this alone (`transferkit.inference.checkpoint`), so
they never import Lightning, torchmetrics or the LightningModule; `runs.checkpoints` rebuilds
the TransferModule from the same dict for train, eval and export.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from transferkit.errors import ConfigError

RECORD_KEY = "transferkit"  # the checkpoint entry with what the run records beside the model
MADE_BY = "Use a checkpoints/best.ckpt or last.ckpt written by train.py."

# Where the modules a checkpoint's `_target_`s name (finetune._target_, say) lived before the
# packages by noun (2026-12): the one place old paths are mapped, so an old run still
# evaluates, predicts, exports and resumes.
MOVED = {
    "transferkit.config.": "transferkit.config.build.",
    "transferkit.config_types.": "transferkit.config.types.",
    "transferkit.preprocessing.": "transferkit.backbones.preprocessing.",
    "transferkit.backbone_reference.": "transferkit.backbones.reference.",
    "transferkit.module.": "transferkit.model.module.",
    "transferkit.heads.": "transferkit.model.heads.",
    "transferkit.metrics.": "transferkit.model.metrics.",
    "transferkit.multilabel.": "transferkit.model.multilabel.",
    "transferkit.history.": "transferkit.model.history.",
    "transferkit.finetune.": "transferkit.training.finetune.",
    "transferkit.optim.": "transferkit.training.optim.",
    "transferkit.schedulers.": "transferkit.training.schedulers.",
    "transferkit.callbacks.": "transferkit.training.callbacks.",
    "transferkit.interrupts.": "transferkit.training.interrupts.",
    "transferkit.loggers.": "transferkit.training.loggers.",
    "transferkit.lr_finder.": "transferkit.training.lr_finder.",
    "transferkit.swa.": "transferkit.training.swa.",
    "transferkit.distributed.": "transferkit.training.distributed.",
    "transferkit.rng.": "transferkit.training.rng.",
    "transferkit.model_summary.": "transferkit.training.model_summary.",
    "transferkit.run_dirs.": "transferkit.runs.directories.",
    "transferkit.checkpoints.": "transferkit.runs.checkpoints.",
    "transferkit.sweeps.": "transferkit.runs.sweeps.",
    "transferkit.exporting.": "transferkit.inference.exporting.",
    "transferkit.plots.": "transferkit.reports.plots.",
}
_CHUNK = 1 << 20


def current_paths(value: Any) -> Any:
    """`value` (a record or hyper-parameters, nested) with every old module path made today's."""
    if isinstance(value, dict):
        return {key: current_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [current_paths(item) for item in value]
    if isinstance(value, str) and value.startswith("transferkit."):
        old = next((old for old in MOVED if value.startswith(old)), None)
        return value if old is None else MOVED[old] + value[len(old) :]
    return value


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, its hyper-parameters and record naming today's module paths, or a
    ConfigError saying what the file is instead."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist. {MADE_BY}")
    if path.suffix == ".onnx":
        raise ConfigError(
            f"ckpt_path={path} is an exported ONNX model; this task needs the .ckpt it was exported "
            "from (predict.py also takes model.onnx)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"ckpt_path={path} is not a PyTorch checkpoint ({first}). {MADE_BY}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "class_names" not in hparams or "state_dict" not in checkpoint:
        raise ConfigError(
            f"ckpt_path={path} is a checkpoint of another kind: it has no transferkit model "
            f"(hyper-parameters with class names, and a state dict). {MADE_BY}"
        )
    for key in ("hyper_parameters", RECORD_KEY):
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = current_paths(checkpoint[key])
    return checkpoint


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes: what an export of a checkpoint is found by before the model is
    built (20 ms for a fine-tuned Lite0's 14 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

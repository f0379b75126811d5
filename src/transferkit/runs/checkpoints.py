"""Reading a training checkpoint back: the model, and what the run recorded beside it.

A checkpoint is everything eval, predict and export need. Besides Lightning's state it holds a
`transferkit` entry: the data the model was trained on (so `eval.py` can find it again) and the
one precision the run's frozen backbone ran in (so eval reproduces the logged numbers).
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from transferkit.backbones.preprocessing import CROP_SCALE
from transferkit.errors import ConfigError
from transferkit.features.precision import PRECISIONS, precision_name
from transferkit.model.module import RECORD_KEY, TransferModule

_MADE_BY = "Use a checkpoints/best.ckpt or last.ckpt written by train.py."

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
    """The checkpoint dict, or a ConfigError saying what the file is instead."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist. {_MADE_BY}")
    if path.suffix == ".onnx":
        raise ConfigError(
            f"ckpt_path={path} is an exported ONNX model; this task needs the .ckpt it was exported "
            "from (predict.py also takes model.onnx)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"ckpt_path={path} is not a PyTorch checkpoint ({first}). {_MADE_BY}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "class_names" not in hparams or "state_dict" not in checkpoint:
        raise ConfigError(
            f"ckpt_path={path} is a checkpoint of another kind: it has no transferkit model "
            f"(hyper-parameters with class names, and a state dict). {_MADE_BY}"
        )
    return _current(checkpoint)


def _current(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with its hyper-parameters and record naming today's module paths."""
    for key in ("hyper_parameters", RECORD_KEY):
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = current_paths(checkpoint[key])
    return checkpoint


def load_model(path: str | Path) -> TransferModule:
    """The model rebuilt from the checkpoint (and the named weights it keeps a frozen backbone
    by, read from this machine: nothing is downloaded), in eval mode, with the run's record
    restored: `data_config`, `run_record`, and `frozen_dtype` set to the precision validation ran
    the backbone in (fp32 for checkpoints that predate the record)."""
    checkpoint = read_checkpoint(path)
    hparams = {**checkpoint["hyper_parameters"], "weights": None}  # the state dict has or names them
    if hparams.get("preprocessing") is not None:  # saved before crop modes: evaluated with a centre crop
        hparams["preprocessing"] = {"crop_mode": "center", **hparams["preprocessing"]}
    record = checkpoint.get(RECORD_KEY) or {}
    model = TransferModule(
        **hparams,
        data_config=record.get("data"),
        seed=record.get("seed"),
        finetune=record.get("finetune"),
        frozen_dtype=PRECISIONS[record.get("precision", "fp32")],
    )
    for key in ("augment", "splits"):  # known as the fit started: what eval compares
        if key in record:
            model.run_record[key] = record[key]
    model.on_load_checkpoint(checkpoint)  # the tensors kept by reference
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ConfigError(
            f"ckpt_path={path}: its weights do not fit the model its hyper-parameters describe "
            f"({str(error).splitlines()[0]}). {_MADE_BY}"
        ) from None
    return model.eval()


# What may change when a run is resumed: where things are and how fast, not what trains.
_RESUMABLE = {
    "model.compile",
    "scheduler.max_epochs",  # follows trainer.max_epochs: a resume may train longer
    "data.root",
    "data.labels",  # the same label file, moved with the images
    "data.batch_size",  # a smaller GPU: the resumed epoch skips the samples trained, in any size
    "data.num_workers",
    "data.persistent_workers",
    "data.scan_cache_dir",
}
_OWN_GROUPS = ("optimizer", "scheduler", "preprocessing")  # hyper-parameters named as their config group


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _setup(hparams: dict[str, Any], data: dict | None, finetune: dict | None) -> dict[str, Any]:
    """A run's setup as dotted config keys (model.name, optimizer.lr, data.image_size, ...)."""
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        flat.update(_flat(value, key if key in _OWN_GROUPS else f"model.{key}"))
    flat.update(_flat(data, "data") if data is not None else {})
    flat.update(_flat(finetune, "finetune") if finetune is not None else {})
    return flat


def _as_trained(setup: dict[str, Any]) -> dict[str, Any]:
    """An older checkpoint's setup with the keys added since, at the values its run trained
    with, so they are compared like any other: a resume cannot quietly switch an old gradual run
    (which unfroze the whole backbone) to one block, or change its training crop."""
    if any(key.startswith("data.") for key in setup):
        setup.setdefault("data.crop_scale", list(CROP_SCALE))
    if str(setup.get("finetune._target_", "")).endswith(".Gradual"):
        setup.setdefault("finetune.unfreeze_last", None)
    return setup


def _peek(path: str | Path) -> dict[str, Any]:
    """A checkpoint's hyper-parameters and record, without reading its weights; read once per
    version of the file (a resume asks for its seed, setup, splits and augmentation in turn)."""
    stat = os.stat(path)
    return _read_record(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_record(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """`_peek` for one version of a file (its mtime and size are the key): memory-mapped, so
    the weights are never read, and only the small entries kept."""
    del mtime_ns, size  # the cache key only
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return _current({key: checkpoint.get(key) for key in ("hyper_parameters", RECORD_KEY)})


def recorded_seed(path: str | Path) -> int | None:
    """The seed the run of a training checkpoint used (None for checkpoints that predate it)."""
    record = _peek(path).get(RECORD_KEY) or {}
    seed = record.get("seed", (record.get("data") or {}).get("seed"))
    return None if seed is None else int(seed)


def recorded_splits(path: str | Path) -> dict[str, Any] | None:
    """Each split's file count and digest as the run of a training checkpoint recorded them
    (`transferkit.data.digests`; None for checkpoints that predate them)."""
    return (_peek(path).get(RECORD_KEY) or {}).get("splits")


def resume_differences(path: str | Path, model: TransferModule) -> list[tuple[str, Any, Any]]:
    """What `model` (built from this command's config, with its run record) would train
    differently from the run `path` checkpointed: (key, there, here) each.

    A part the checkpoint does not record (older checkpoints) is not compared.
    """
    checkpoint = _peek(path)
    record = checkpoint.get(RECORD_KEY) or {}
    there = _as_trained(
        _setup(checkpoint.get("hyper_parameters") or {}, record.get("data"), record.get("finetune"))
    )
    here = _setup(
        dict(model.hparams),
        model.data_config if "data" in record else None,
        model.run_record.get("finetune") if "finetune" in record else None,
    )
    for group in ("features", "trainer"):  # each compared where the checkpoint records it
        if group in record:
            there.update(_flat(record[group] or {}, group))
            here.update(_flat(model.run_record.get(group) or {}, group))
    if "precision" in record:  # what the settings resolved to on the machine of each
        there["features.precision (as run)"] = record["precision"]
        here["features.precision (as run)"] = precision_name(model.frozen_dtype)
    return [
        (key, there[key], here.get(key))
        for key in sorted(there)  # a key newer than the checkpoint is not compared
        if key not in _RESUMABLE and there[key] != here.get(key)
    ]


def recorded_augment(path: str | Path) -> tuple[bool, str | None]:
    """Whether the run `path` checkpointed recorded the augmentation its training got, and
    which (None: none, as on cached features of one view)."""
    record = _peek(path).get(RECORD_KEY) or {}
    return "augment" in record, record.get("augment")

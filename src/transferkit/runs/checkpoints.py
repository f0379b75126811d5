"""Reading a training checkpoint back: the model, and what the run recorded beside it.

A checkpoint is everything eval, predict and export need. Besides Lightning's state it holds a
`transferkit` entry: the data the model was trained on (so `eval.py` can find it again) and the
one precision the run's frozen backbone ran in (so eval reproduces the logged numbers). The file
itself is read by `runs.checkpoint_file`, which predict and serve use without this module (and
the LightningModule it builds).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from transferkit.backbones.preprocessing import CROP_SCALE
from transferkit.errors import ConfigError
from transferkit.features.precision import PRECISIONS, precision_name
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoint_file import MADE_BY, RECORD_KEY, current_paths, read_checkpoint


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
            f"({str(error).splitlines()[0]}). {MADE_BY}"
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
    return {key: current_paths(checkpoint.get(key)) for key in ("hyper_parameters", RECORD_KEY)}


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

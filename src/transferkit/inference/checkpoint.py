"""A train.py checkpoint as predict, serve and eval apply it, without Lightning: what its outputs
mean and how its inputs are made (`ModelInfo`, from its hyper-parameters), its classifier
rebuilt from backbone and head (`build_classifier`), and where its onnxruntime export is found
by the file alone (`cached_export`), so a later run on the same checkpoint builds no PyTorch
model at all (nor imports timm: 2.7 s of a start-up on 2 cores)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import transferkit
from transferkit.backbones.preprocessing import Preprocessing
from transferkit.errors import ConfigError
from transferkit.files import write_atomic
from transferkit.inference.exporting import Classifier
from transferkit.model.heads import build_head
from transferkit.runs.checkpoint_file import MADE_BY, RECORD_KEY, file_digest
from transferkit.runtime import OnnxModule
from transferkit.runtime.onnx import onnxruntime_name

log = logging.getLogger(__name__)

FORMAT = 1  # of the checkpoints' export index: a new one exports again
_INDEX = "checkpoints"  # the folder of the runtime directory mapping a checkpoint to its export
_MODEL_PARTS = ("backbone.", "head.")  # the state dict's keys the classifier holds


@dataclass
class ModelInfo:
    """What a predictor says of its model: the class names, the preprocessing its inputs get,
    whether it is multi-label, and then its per-class decision thresholds."""

    class_names: list[str]
    preprocessing: Preprocessing
    multilabel: bool = False
    thresholds: torch.Tensor | None = None

    @classmethod
    def of(cls, model: Any) -> ModelInfo:
        """A TransferModule's (or anything with its class_names, preprocessing, multilabel and
        thresholds)."""
        thresholds = model.thresholds.detach().float().cpu().clone() if model.multilabel else None
        return cls(list(model.class_names), model.preprocessing, bool(model.multilabel), thresholds)


def _recorded_preprocessing(hparams: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing the checkpoint records, as load_model reads it (one saved before crop
    modes was evaluated with a centre crop)."""
    recorded = hparams.get("preprocessing")
    return None if recorded is None else {"crop_mode": "center", **recorded}


def _thresholds(hparams: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> torch.Tensor | None:
    if not hparams.get("multilabel"):
        return None
    if "thresholds" not in state:
        raise ConfigError(f"ckpt_path={path} is a multi-label model without its thresholds. {MADE_BY}")
    return state["thresholds"].detach().float().clone()


def recorded_info(checkpoint: dict[str, Any], path: Path) -> ModelInfo | None:
    """The checkpoint's ModelInfo from its hyper-parameters and thresholds, the model unbuilt;
    None where the preprocessing it records leaves a value to the backbone's defaults."""
    hparams = checkpoint["hyper_parameters"]
    recorded = _recorded_preprocessing(hparams)
    if recorded is None or {f.name for f in fields(Preprocessing)} - recorded.keys():
        return None
    preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
    thresholds = _thresholds(hparams, checkpoint["state_dict"], path)
    return ModelInfo(list(hparams["class_names"]), preprocessing, thresholds is not None, thresholds)


def build_classifier(checkpoint: dict[str, Any], path: Path) -> tuple[Classifier, ModelInfo]:
    """The checkpoint's backbone and head with its weights (those it keeps by reference put back
    from the named weights on this machine: nothing is downloaded), in eval mode, as
    `runs.checkpoints.load_model` builds them. The model families are imported here, when a
    model is built: a cached export needs none of them."""
    from transferkit.backbones import build_backbone
    from transferkit.backbones.reference import put_back

    hparams = checkpoint["hyper_parameters"]
    backbone = build_backbone(hparams["name"], None)  # the state dict has or names the weights
    head = build_head(backbone.num_features, len(hparams["class_names"]), **(hparams.get("head") or {}))
    net = Classifier(backbone.model, head)
    state = dict(checkpoint["state_dict"])
    put_back(checkpoint.get(RECORD_KEY), state, None)
    try:
        net.load_state_dict({k: v for k, v in state.items() if k.startswith(_MODEL_PARTS)})
    except RuntimeError as error:
        raise ConfigError(
            f"ckpt_path={path}: its weights do not fit the model its hyper-parameters describe "
            f"({str(error).splitlines()[0]}). {MADE_BY}"
        ) from None
    preprocessing = backbone.preprocessing.with_overrides(**(_recorded_preprocessing(hparams) or {}))
    thresholds = _thresholds(hparams, state, path)
    info = ModelInfo(list(hparams["class_names"]), preprocessing, thresholds is not None, thresholds)
    return net.eval(), info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def export_key(path: Path) -> str:
    """What finds a checkpoint's export before its model is built: the file's bytes (its
    weights, the names and digests of those it keeps by reference, its preprocessing and so its
    input size) and the versions of the code that builds and runs the model."""
    header = {
        "format": FORMAT,
        "file": file_digest(path),
        "runtime": onnxruntime_name(),
        "versions": {
            "torch": torch.__version__,
            "transferkit": transferkit.__version__,
            **{package: _version(package) for package in ("torchvision", "timm")},
        },
    }
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def _index(key: str, directory: Path) -> Path:
    return directory / _INDEX / f"{key[:32]}.json"


def cached_export(key: str, directory: str | Path) -> OnnxModule | None:
    """The session of the export made for the checkpoint of `key` (`remember_export`), or None
    when there is none (or it no longer opens)."""
    index = _index(key, Path(directory))
    try:
        export = Path(directory) / json.loads(index.read_text())["export"]
        return OnnxModule(export)
    except Exception:  # noqa: BLE001 - a missing, stale or unreadable entry: the export is made again
        return None


def remember_export(key: str, session: OnnxModule, directory: str | Path, path: Path) -> None:
    """Map the checkpoint of `key` to its export; where the directory cannot be written, the
    next run finds the export by building the model again, as this one did."""
    entry = {"export": session.path.name, "checkpoint": str(path.resolve())}
    with contextlib.suppress(OSError):
        index = _index(key, Path(directory))
        index.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(index, json.dumps(entry))

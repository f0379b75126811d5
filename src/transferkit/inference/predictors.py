"""A trained classifier behind one call, `logits(images)`: a checkpoint run by PyTorch, or an
exported `model.onnx` run by onnxruntime (the `onnx` extra). Both carry their class names and
preprocessing, and whether the model is multi-label (`multilabel`; its per-class decision
`thresholds`, else None)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from transferkit.backbones.preprocessing import Preprocessing
from transferkit.errors import ConfigError
from transferkit.extras import require
from transferkit.features.precision import checkpoint_precision
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import load_model


def best_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA, then Apple's MPS, then the CPU; any other value is a torch device name."""
    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ConfigError(f"device={device} is not a device ({error}); use auto, cpu, cuda:0.") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TorchPredictor:
    """A TransferModule in inference: every parameter frozen, so the backbone runs through the
    frozen forward (no autograd, `dtype`, CPU chunks) and the head in fp32."""

    def __init__(self, model: TransferModule, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.model.frozen_dtype = dtype
        self.device = device
        self.class_names = model.class_names
        self.preprocessing = model.preprocessing
        self.multilabel = model.multilabel
        self.thresholds = model.thresholds.detach().float().cpu().clone() if model.multilabel else None

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float().cpu()


class OnnxPredictor:
    """An exported model.onnx, with the model.json export.py writes beside it."""

    def __init__(self, path: Path) -> None:
        ort = require("onnxruntime", extra="onnx", feature=f"ckpt_path={path} (an ONNX model)")
        meta_path = path.with_name("model.json")
        if not meta_path.is_file():
            raise ConfigError(f"{path} has no model.json beside it; export the model with export.py.")
        meta = json.loads(meta_path.read_text())
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing = Preprocessing(**_tuples(meta["preprocessing"]))
        self.multilabel, self.thresholds = _decision(meta, meta_path)
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ConfigError(f"ckpt_path={path} is not a model onnxruntime can load ({error}).") from None
        self.input_name = self.session.get_inputs()[0].name
        self.device = torch.device("cuda" if self.session.get_providers()[0].startswith("CUDA") else "cpu")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: images.float().numpy()})
        return torch.from_numpy(out)


def _decision(meta: dict[str, Any], meta_path: Path) -> tuple[bool, torch.Tensor | None]:
    """(multilabel, thresholds) as model.json gives them; one written before multi-label models
    has neither key and is single-label."""
    if not meta.get("multilabel", False):
        return False, None
    thresholds = meta.get("thresholds")
    if not isinstance(thresholds, list) or len(thresholds) != len(meta["class_names"]):
        raise ConfigError(
            f"{meta_path} describes a multi-label model without a threshold per class; "
            "export the checkpoint again with export.py."
        )
    return True, torch.tensor(thresholds, dtype=torch.float32)


def _tuples(preprocessing: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in preprocessing.items()}


def load_predictor(
    path: str | Path, device: str = "auto", precision: str | None = None
) -> TorchPredictor | OnnxPredictor:
    """A predictor for a train.py checkpoint or an export.py model.onnx.

    `precision` None runs the backbone as eval.py does (`checkpoint_precision`), so predict and
    eval give the same probabilities for an image on any machine, whatever its bf16 support.
    """
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        return OnnxPredictor(path)
    model = load_model(path)
    target = best_device(device)
    return TorchPredictor(model, target, checkpoint_precision(precision, model.frozen_dtype, target))

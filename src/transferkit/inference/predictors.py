"""A trained classifier behind one call, `logits(images)`: a checkpoint on onnxruntime (its
export made once and found again by the file's digest) or on PyTorch, or an exported
`model.onnx`. Each carries its class names and preprocessing, whether the model is multi-label
(`multilabel`; its per-class decision `thresholds`, else None), and the `runtime` that computes
it (results.json records it).

On a CPU in fp32 a checkpoint runs on onnxruntime by default (`runtime=auto`): 3-4x eager
PyTorch's images/s there (docs/speed.md), to the export's parity tolerance
(`transferkit.runtime.PARITY_RTOL`). Nothing here imports Lightning: predict.py and serve.py
start in the time their own work takes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferkit.backbones.preprocessing import Preprocessing
from transferkit.errors import ConfigError
from transferkit.features.precision import PRECISIONS, checkpoint_precision, frozen_forward
from transferkit.inference.checkpoint import (
    ModelInfo,
    build_classifier,
    cached_export,
    export_key,
    recorded_info,
    remember_export,
)
from transferkit.inference.exporting import Classifier
from transferkit.runs.checkpoint_file import RECORD_KEY, read_checkpoint
from transferkit.runtime import RUNTIMES, TORCH, OnnxModule, resolve_runtime, session_for
from transferkit.runtime.onnx import onnxruntime_name

if TYPE_CHECKING:
    from transferkit.model.module import TransferModule

log = logging.getLogger(__name__)
# Where a checkpoint's exports go when no config names it: conf's ${paths.cache_dir}/features/onnx
# from where the command runs, beside those of training's frozen backbones.
RUNTIME_DIR = Path(".cache/features/onnx")


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


class Predictor:
    """What predict_files and the server ask of a model: `logits(images)` for images (B, 3, H, W)
    preprocessed as `preprocessing` says, on `device`, computed by `runtime` in `dtype`."""

    def __init__(self, info: ModelInfo, device: torch.device, runtime: str, dtype: torch.dtype) -> None:
        self.class_names: list[str] = info.class_names
        self.preprocessing: Preprocessing = info.preprocessing
        self.multilabel: bool = info.multilabel
        self.thresholds: torch.Tensor | None = info.thresholds
        self.device, self.runtime, self.dtype = device, runtime, dtype

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchPredictor(Predictor):
    """A backbone and head in PyTorch inference: the backbone through the frozen forward (no
    autograd, `dtype`, channels_last, CPU chunks) and the head in fp32, as training validated."""

    def __init__(self, net: nn.Module, info: ModelInfo, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(info, device, TORCH, dtype)
        self.backbone = net.backbone.eval().requires_grad_(False).to(device)
        self.head = net.head.eval().requires_grad_(False).to(device)
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.backbone.modules())
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(frozen_forward(self.backbone, images, self.dtype)).float().cpu()


class SessionPredictor(Predictor):
    """A checkpoint's classifier on its onnxruntime export (`transferkit.runtime.session_for`)."""

    def __init__(self, session: OnnxModule, info: ModelInfo) -> None:
        super().__init__(info, torch.device("cpu"), session.name, torch.float32)
        self.session = session

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.session(images)


class OnnxPredictor(Predictor):
    """An exported model.onnx, with the model.json export.py writes beside it."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort  # imported here: a checkpoint on PyTorch does without it

        meta_path = path.with_name("model.json")
        if not meta_path.is_file():
            raise ConfigError(f"{path} has no model.json beside it; export the model with export.py.")
        meta = json.loads(meta_path.read_text())
        multilabel, thresholds = _decision(meta, meta_path)
        info = ModelInfo(
            list(meta["class_names"]), Preprocessing(**_tuples(meta["preprocessing"])), multilabel, thresholds
        )
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as a checkpoint's session runs
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ConfigError(f"ckpt_path={path} is not a model onnxruntime can load ({error}).") from None
        self.input_name = self.session.get_inputs()[0].name
        device = torch.device("cuda" if self.session.get_providers()[0].startswith("CUDA") else "cpu")
        super().__init__(info, device, onnxruntime_name(), torch.float32)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: images.float().contiguous().numpy()})
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
    path: str | Path,
    device: str = "auto",
    precision: str | None = None,
    runtime: str = "auto",
    runtime_dir: str | Path = RUNTIME_DIR,
    model: TransferModule | None = None,
) -> Predictor:
    """A predictor for a train.py checkpoint or an export.py model.onnx.

    `precision` None runs the backbone as eval.py does (`checkpoint_precision`), so predict and
    eval give the same probabilities for an image on any machine, whatever its bf16 support.
    `runtime` (auto, onnx, torch; `transferkit.runtime.resolve_runtime`) says what computes a
    checkpoint: its export under `runtime_dir` is made on first use and found again by the
    file's digest, so a later run builds no PyTorch model. `model`: the checkpoint's, where the
    caller has built it (eval), so it is not built twice.
    """
    path = Path(path)
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime!r} is not one of: {', '.join(RUNTIMES)}.")
    if path.suffix == ".onnx" and path.is_file():
        if runtime == TORCH:
            raise ConfigError(
                f"runtime=torch cannot run ckpt_path={path}: an exported model runs on onnxruntime; "
                "use runtime=auto, or give the .ckpt it was exported from."
            )
        return OnnxPredictor(path)
    checkpoint = read_checkpoint(path)
    target = best_device(device)
    recorded = PRECISIONS[(checkpoint.get(RECORD_KEY) or {}).get("precision", "fp32")]
    dtype = checkpoint_precision(precision, recorded, target)
    built = None if model is None else (model, ModelInfo.of(model))
    if resolve_runtime(runtime, target, dtype, key="runtime") == TORCH:
        net, info = built or build_classifier(checkpoint, path)
        return TorchPredictor(net, info, target, dtype)
    key = export_key(path)
    info = recorded_info(checkpoint, path)
    session = cached_export(key, runtime_dir) if info is not None else None
    if session is not None:
        return SessionPredictor(session, info)
    net, info = built or build_classifier(checkpoint, path)
    size = info.preprocessing.image_size
    classifier = Classifier(net.backbone, net.head)
    session = session_for(classifier, (3, size, size), runtime_dir, f"ckpt_path={path}")
    if session is None:  # session_for said why
        return TorchPredictor(net, info, target, dtype)
    remember_export(key, session, runtime_dir, path)
    return SessionPredictor(session, info)

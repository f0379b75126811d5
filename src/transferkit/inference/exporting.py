"""A trained model as a file that runs without transferkit: ONNX (dynamic batch size) or
TorchScript, checked against PyTorch before it is called a success; and the classifier both
formats hold: a checkpoint's backbone and head without the LightningModule around them."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
_ONNX_SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf caps a file at 2 GB; above it weights go beside it


class Classifier(nn.Module):
    """images (B, 3, H, W), normalised as model.json says -> logits (B, classes), fp32. Its
    state dict's keys are the TransferModule's (backbone.*, head.*), so a checkpoint's weights
    load into it without Lightning (`inference.checkpoint`)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """With torch.onnx's dynamo exporter; the batch dimension is dynamic."""
    size = sum(p.numel() * p.element_size() for p in net.parameters())
    batch = torch.export.Dim("batch", min=1)
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # they log every optimisation pass
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=size > _ONNX_SINGLE_FILE_LIMIT,
        )


def export_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traced: the classifier has no data-dependent control flow. PyTorch deprecates TorchScript
    in favour of torch.export; it still loads anywhere libtorch runs, so it is offered as is."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(net, example).save(str(path))


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
}


def load_exported(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported file as a function of images: onnxruntime for ONNX, torch.jit for TorchScript."""
    if path.suffix == ".onnx":
        import onnxruntime as ort  # 0.2 s of imports, for ONNX only

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: torch.from_numpy(session.run(None, {name: images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    return lambda images: module(images).detach()


def parity(net: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """The largest absolute logit difference between PyTorch and the export, over `images` as one
    batch and image by image (which also exercises the dynamic batch size)."""
    with torch.no_grad():
        reference = net(images)
    batched = exported(images)
    single = torch.cat([exported(image[None]) for image in images])
    return max(float((batched - reference).abs().max()), float((single - reference).abs().max()))

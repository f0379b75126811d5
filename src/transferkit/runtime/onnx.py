"""A frozen module on onnxruntime: exported once with torch.onnx's dynamo exporter (dynamic
batch size), its output checked against PyTorch's as it is made, and kept under a directory by a
key of its weights, code, input shape and the versions that made it, so every later run (train,
eval, predict, serve) opens it in milliseconds.

The export takes seconds (7 s for Lite0 on 2 cores), once per weights; a session of it runs
Lite0 at 224 px at 3-4x eager PyTorch's images/s on a CPU (docs/speed.md). A module that cannot
be exported, or whose export disagrees with PyTorch, runs on PyTorch, said in one INFO line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import fx, nn

from transferkit.errors import first_line
from transferkit.files import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1  # of the exports' key: a new one re-exports
# The largest difference allowed between PyTorch's and onnxruntime's output, relative to the
# largest absolute output: both compute fp32, in other orders (Lite0: 1.2e-6 of it).
PARITY_RTOL = 1e-4
_CHECK_IMAGES = 3  # random images the parity check runs, as one batch and one by one


def onnxruntime_name() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


class OnnxModule:
    """An exported model as a function of fp32 tensors (any memory format), on the CPU, with
    `threads` threads (torch's count: the process's share of the cores). Pickles as its path,
    so a model holding one can go to a spawned process. `name` is what results and cache keys
    record of it."""

    runs_whole_batches = True  # onnxruntime keeps large batches fast: no CPU chunks (`frozen_forward`)

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path, self.threads = Path(path), threads or torch.get_num_threads()
        self.name = onnxruntime_name()
        self._open()

    def _open(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its warnings about unused initialisers are not the user's
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "threads": self.threads, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()


def module_code(module: nn.Module) -> str:
    """What says which function a module computes besides its weights: an fx graph's code (a
    prefix of a backbone), else the module tree's repr (layer settings, pooling, the classes).
    BatchNorm's `track_running_stats` is left out: the export runs in eval mode, where running
    statistics that exist (they are in the weights) are used either way, so a backbone a run
    froze (which stops them tracking) and the same one unfrozen (the audit's) share an export."""
    if isinstance(module, fx.GraphModule):
        return module.code
    tree = re.sub(r", track_running_stats=(True|False)", "", repr(module))
    return f"{type(module).__module__}.{type(module).__qualname__}\n{tree}"


def export_key(module: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The export's key: every tensor of the module (names, dtypes, bytes), its code, the input
    shape of one image and the versions of torch and onnxruntime."""
    digest = hashlib.sha256()
    header = {
        "format": FORMAT,
        "input": list(input_shape),
        "torch": torch.__version__,
        "runtime": onnxruntime_name(),
        "code": module_code(module),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ExportFailed(Exception):
    """Why the module runs on PyTorch instead (a clause)."""


@contextlib.contextmanager
def _inference(module: nn.Module):
    """`module` in eval mode without autograd, each sub-module's mode restored after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):  # they log every pass
        logging.getLogger(name).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            input_names=["inputs"],
            output_names=["outputs"],
            dynamic_shapes=({0: batch},),
            external_data=False,
        )


def check_parity(module: nn.Module, exported: OnnxModule, input_shape: tuple[int, ...]) -> float:
    """The largest difference between PyTorch and the export over random images, as one batch
    and one by one (the dynamic batch size), relative to the largest output; ExportFailed past
    PARITY_RTOL."""
    images = torch.randn(_CHECK_IMAGES, *input_shape, generator=torch.Generator().manual_seed(0))
    with _inference(module):
        reference = module(images).float()
    batched = exported(images)
    single = torch.cat([exported(image[None]) for image in images])
    if batched.shape != reference.shape:
        raise ExportFailed(f"the export returns {tuple(batched.shape)}, PyTorch {tuple(reference.shape)}")
    scale = float(reference.abs().max()) or 1.0
    difference = max(float((batched - reference).abs().max()), float((single - reference).abs().max()))
    relative = difference / scale
    if not relative <= PARITY_RTOL:  # NaN too
        raise ExportFailed(
            f"its onnxruntime export differs from PyTorch by {relative:.2g} of the largest output "
            f"(more than {PARITY_RTOL:g})"
        )
    return relative


def session_for(
    module: nn.Module, input_shape: tuple[int, ...], directory: str | Path, what: str
) -> OnnxModule | None:
    """`module` (on the CPU, fp32) on onnxruntime for inputs of `input_shape` per item: the
    export under `directory` for its key, made now (under a lock: runs at once export it once)
    if there is none. None, with one INFO line naming `what` and why, when it runs on PyTorch."""
    try:
        key = export_key(module, input_shape)
        path = Path(directory) / f"{key[:32]}.onnx"
        if path.is_file():
            with contextlib.suppress(Exception):  # an unreadable file is made again below
                return OnnxModule(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_suffix(".lock")):
            if not path.is_file():
                _make(module, input_shape, path, what)
        return OnnxModule(path)
    except ExportFailed as reason:
        log.info("%s runs on PyTorch: %s.", what, reason)
    except OSError as error:
        log.info("%s runs on PyTorch: its onnxruntime export cannot be written (%s).", what, error)
    except Exception as error:  # noqa: BLE001 - the exporter raises anything from any layer
        log.info("%s runs on PyTorch: it cannot be exported to ONNX (%s).", what, first_line(error))
    return None


def _make(module: nn.Module, input_shape: tuple[int, ...], path: Path, what: str) -> None:
    """Export, check and publish `path` (with its parity record beside it, `<key>.json`). The
    random generators are left as they were: a run that made the export and one that found it
    must go on drawing the same numbers (shuffling, dropout, augmentation)."""
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.onnx")
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.random.fork_rng(devices=[]), _inference(module):
            _export(module, example, tmp)
            relative = check_parity(module, OnnxModule(tmp), input_shape)
        write_atomic(
            path.with_suffix(".json"),
            json.dumps(
                {"what": what, "parity": relative, "tolerance": PARITY_RTOL, "input": list(input_shape)}
            ),
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s exported to onnxruntime (%s; parity %.1e of the largest output).", what, path, relative)

"""Which runtime a frozen part runs on: `auto` is onnxruntime on a CPU in fp32 (3.9x eager
PyTorch's images/s for Lite0 on 2 cores: docs/speed.md), PyTorch on a GPU (channels_last and
bf16/fp16 autocast there) and wherever onnxruntime is not installed."""

from __future__ import annotations

import importlib.util
import logging

import torch

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "torch")
TORCH = "torch"  # the name results and cache keys give PyTorch; onnxruntime's carries its version


def resolve_runtime(
    setting: str, device: torch.device, dtype: torch.dtype, key: str = "features.runtime"
) -> str:
    """ "onnx" or "torch" for `setting` (the config `key`) on `device` in `dtype`; an explicit
    `onnx` that cannot run is refused in one line, `auto` falls back to PyTorch."""
    if setting not in RUNTIMES:
        raise ConfigError(f"{key}={setting!r} is not one of: {', '.join(RUNTIMES)}.")
    if setting == TORCH:
        return TORCH
    why = None
    if device.type != "cpu":
        why = f"onnxruntime runs here on the CPU and this device is {device.type}"
    elif dtype != torch.float32:
        why = f"onnxruntime runs fp32 here and the precision is {dtype} (PyTorch autocast)"
    elif importlib.util.find_spec("onnxruntime") is None:
        why = "onnxruntime is not installed (pip install onnxruntime)"
    if why is None:
        return "onnx"
    if setting == "onnx":
        raise ConfigError(f"{key}=onnx cannot be used: {why}; use {key}=auto or torch.")
    if device.type == "cpu":  # on a GPU PyTorch is the choice, not a fallback
        log.info("The frozen backbone runs on PyTorch: %s.", why)
    return TORCH

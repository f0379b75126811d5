"""The dtype a frozen backbone runs in: one decision per run, the same on every CPU.

`auto` is fp32 on a CPU whatever its kind, so a command gives the same numbers on an AVX2-only
CPU and on one with native bf16 (AVX512-BF16/AMX), and bf16 on a CUDA device that has it.
Reduced precision applies only to a backbone frozen for the whole run: a strategy that trains
blocks of it runs fp32 throughout, cached or not, so the cache never changes what trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache

import torch

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def precision_name(dtype: torch.dtype) -> str:
    """The setting's name for a dtype (bf16, fp16, fp32), as configs and results write it."""
    return next(name for name, d in PRECISIONS.items() if d == dtype)


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device, key: str = "features.precision") -> torch.dtype:
    """`precision` (auto, bf16, fp16, fp32; the config `key`) as the dtype to run on `device`:
    `auto` is bf16 on a CUDA device with bf16 and fp32 on every CPU (never read from its kind)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and native_bf16(device) else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not one of: auto, {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def run_precision(precision: str, device: torch.device, trains_backbone: bool, strategy: str) -> torch.dtype:
    """The one precision the frozen part of this run's backbone runs in, on the cached and the
    uncached path alike. A run that trains blocks of the backbone (`strategy` names how) runs its
    frozen blocks in fp32, as the trained ones: a reduced precision there would make the prefix
    cache (computed once, in that precision) train on other numbers than the images do."""
    if not trains_backbone:
        return resolve_precision(precision, device)
    if precision not in ("auto", "fp32"):
        resolve_precision(precision, device)  # an unknown name is refused as such first
        raise ConfigError(
            f"features.precision={precision} runs a wholly frozen backbone in {precision}, but {strategy} "
            "trains blocks of it, which run in fp32: use features.precision=auto (or fp32)."
        )
    return torch.float32


def checkpoint_precision(precision: str | None, recorded: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype eval and predict run a checkpoint's backbone in. `precision` None: the one the
    run recorded (so the numbers match the logged ones on any machine), even where this device
    only emulates it (bf16 on an AVX2-only CPU: slower, said in one line)."""
    if precision is not None:
        return resolve_precision(precision, device, "precision")
    if recorded == torch.bfloat16 and not native_bf16(device):
        log.info(
            "The run trained in bf16, which %s only emulates: slower, with the run's numbers "
            "(precision=fp32 runs faster, with numbers close to them).",
            device,
        )
    return recorded


def autocast(dtype: torch.dtype, device: torch.device) -> AbstractContextManager:
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_chunk_size() -> int:
    """Images per forward call of a frozen backbone on a CPU.

    Large batches spill the activations out of the CPU caches: on 2 cores, Lite0 at 224 px runs
    35.6 images/s in chunks of 4 and 22.4 in batches of 32. Two images per thread keeps every
    thread busy and the working set small.
    """
    return max(4, 2 * torch.get_num_threads())


def frozen_forward(
    backbone: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A frozen backbone's features: no autograd, in `dtype`, in cache-sized chunks on a CPU
    (not for a runtime that `runs_whole_batches`: onnxruntime), returned as fp32."""
    with torch.no_grad(), autocast(dtype, images.device):
        whole = getattr(backbone, "runs_whole_batches", False)
        if images.device.type == "cpu" and len(images) > cpu_chunk_size() and not whole:
            return torch.cat([backbone(chunk).float() for chunk in images.split(cpu_chunk_size())])
        return backbone(images).float()

"""The dtype a frozen backbone runs in: bf16 where the hardware does it natively, else fp32.

bf16 autocast on a CPU without native bf16 is emulated and several times slower than fp32
(4x for Lite0 on an AVX2-only EPYC), so `auto` only picks it where it pays.
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
    """`precision` (auto, bf16, fp16, fp32; the config `key`) as the dtype to run on `device`."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not one of: auto, {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def checkpoint_precision(precision: str | None, recorded: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype eval and predict run a checkpoint's backbone in. `precision` None: the one
    validation ran in during training (so the numbers match the logged ones on any machine),
    unless that is bf16 and this device only emulates it (several times slower): then fp32."""
    if precision is not None:
        return resolve_precision(precision, device, "precision")
    if recorded == torch.bfloat16 and not native_bf16(device):
        log.info("Training validated in bf16; %s has no native bf16, so running in fp32.", device)
        return torch.float32
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
    """A frozen backbone's features: no autograd, in `dtype`, in cache-sized chunks on a CPU,
    returned as fp32."""
    with torch.no_grad(), autocast(dtype, images.device):
        if images.device.type == "cpu" and len(images) > cpu_chunk_size():
            return torch.cat([backbone(chunk).float() for chunk in images.split(cpu_chunk_size())])
        return backbone(images).float()

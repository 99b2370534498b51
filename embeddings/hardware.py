"""What the local device can do fast: CUDA, and CPUs that run bf16 matmuls natively."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "float32", "bfloat16"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions, where oneDNN runs bf16 matmuls natively."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and ("avx512_bf16" in flags or "amx_bf16" in flags)


def inference_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The low-precision dtype for inference at `precision` on `device`; None means plain float32.

    auto: bf16 on CUDA and on CPUs with native bf16 (elsewhere bf16 is emulated and slower than fp32).
    """
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None

"""Device and precision choices shared by training and evaluation."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

# CPU flags (as /proc/cpuinfo spells them) that mean bf16 matmuls run natively, not emulated.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but no CUDA GPU is visible; "
                               "set device: cpu (or auto) in the params file")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports a bf16 dot-product unit (Linux; elsewhere: False, so fp32).

    Without one, oneDNN emulates bf16 and autocast only adds casts; with one (AVX512_BF16 on
    Zen 4+/Cooper Lake, AMX on Sapphire Rapids+) a bf16 matmul is ~5x an fp32 one here.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """``auto``: bf16 on CUDA and on a CPU with native bf16 (:func:`cpu_has_native_bf16`), fp32
    elsewhere. A bf16 run's digits are reproducible on one machine, not across CPU types: set
    ``fp32`` for results that do not depend on the CPU's bf16 support."""
    if precision == "fp32":
        return None
    if precision == "auto" and device.type == "cpu" and not cpu_has_native_bf16():
        return None
    if precision == "auto" and device.type not in ("cpu", "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

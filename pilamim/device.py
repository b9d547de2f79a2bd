"""Device and precision choices shared by training and evaluation."""

from __future__ import annotations

import contextlib

import torch


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


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 on CUDA by default, fp32 on CPU (CPU bf16 autocast is slow and changes results)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

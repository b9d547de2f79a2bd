"""FLOPs per image of a pretraining step, from the layer shapes, and the device peak for MFU.

The loop logs achieved FLOP/s and model FLOPs utilisation (MFU) from these, like nanoGPT: the
step's FLOPs are fixed by the shapes, so they are computed once per run, not counted per step
(``torch.utils.flop_counter`` slows a step down; ``benchmarks/throughput.py`` uses it to check
this function, and ``tests/train/test_flops.py`` does too).
"""

from __future__ import annotations

import math
import os
import re

import torch

from pilamim.config import ModelParams
from pilamim.model.encoder import ENCODER_SIZES
from pilamim.model.masking import num_visible
from pilamim.model.pilamim import PRESETS

# Dense (no structured sparsity) bf16/fp16 tensor-core peak FLOP/s of one GPU, from NVIDIA's
# datasheets, by a substring of ``torch.cuda.get_device_name()``; the first match wins, so
# the PCIe/NVL H100s come before the SXM figure. An unknown device gets no MFU (not a guess).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),  # SXM and PCIe
    ("L4", 121e12),  # not L40/L40S: a match must not run on into a digit or letter
)
PEAK_FLOPS_ENV = "PILAMIM_PEAK_FLOPS"


def analytic_flops(size: str, preset: str, img_size: int, patch_size: int, decoder_depth: int,
                   decoder_width: int, mask_ratio: float = 0.75, in_chans: int = 3,
                   sdpa_recompute: bool = False, patch_matmul: bool = True,
                   depth: int | None = None) -> dict[str, float]:
    """FLOPs per image of one training step (forward + backward), by part, from the layer shapes.

    Counts matmuls and convolutions only, 2 FLOPs per multiply-add, as
    ``torch.utils.flop_counter`` does; norms, activations, AdamW and the EMA update are
    elementwise and left out. A backward costs twice its forward, except for the patch
    embedding (the input image needs no gradient: weight gradient only) and the target encoder
    (it runs under ``no_grad``: forward only).

    ``sdpa_recompute`` adds what fused attention's backward recomputes (the scores: 5 attention
    matmuls instead of 4), which the flop counter charges for ``scaled_dot_product_attention``;
    model FLOPs (for MFU) leave it out. ``patch_matmul`` (the model's default) embeds only the
    visible patches in the encoder; ``False`` embeds all of them, as timm's conv does. ``depth``
    is the encoder's (and target's) block count; ``None`` is the size's own, as
    :func:`pilamim.model.encoder.encoder_spec` resolves it.

    Returns ``encoder``, ``target_forward`` (presets with a target), ``pixel_decoder``,
    ``latent_decoder`` (where the preset has them) and their ``total``.
    """
    _, dim, size_depth, _ = ENCODER_SIZES[size]
    depth = depth or size_depth
    weights = PRESETS[preset]
    n = (img_size // patch_size) ** 2
    keep = num_visible(n, mask_ratio)
    att_bwd = 2.5 if sdpa_recompute else 2.0

    def blocks(tokens: int, width: int, count: int, backward: bool) -> float:
        linear = 2 * 12 * tokens * width**2  # qkv 3d^2 + proj d^2 + fc1 4d^2 + fc2 4d^2
        attention = 2 * 2 * tokens**2 * width  # q @ k^T and attn @ v
        if not backward:
            return count * (linear + attention)
        return count * (3 * linear + (1 + att_bwd) * attention)

    patch = 2 * n * in_chans * patch_size**2 * dim
    encoder_patch = patch * keep / n if patch_matmul else patch
    parts = {"encoder": 2 * encoder_patch + blocks(1 + keep, dim, depth, True)}
    if weights.needs_target:
        parts["target_forward"] = patch + blocks(1 + n, dim, depth, False)

    def decoder(out_dim: int) -> float:
        linear = 2 * ((1 + keep) * dim * decoder_width + (1 + n) * decoder_width * out_dim)
        return 3 * linear + blocks(1 + n, decoder_width, decoder_depth, True)

    if weights.pixel > 0:
        parts["pixel_decoder"] = decoder(patch_size**2 * in_chans)
    if weights.needs_target:
        parts["latent_decoder"] = decoder(dim)
    parts["total"] = sum(parts.values())
    return parts


def step_flops_per_image(model: ModelParams, in_chans: int, patch_matmul: bool = True) -> float:
    """Model FLOPs per image of one training step for these params: what MFU divides by.

    The FLOPs the step needs (no recomputation by fused attention), with the patch embedding
    the model runs (``PiLaMIM.patch_matmul``). ``benchmarks/throughput.py``'s
    ``mfu_model_flops`` embeds every patch instead (the issue's convention): 0.4 % more at
    ViT-B/16.
    """
    return analytic_flops(model.size, model.preset, model.img_size, model.patch_size,
                          model.decoder_depth, model.decoder_width, model.mask_ratio, in_chans,
                          sdpa_recompute=False, patch_matmul=patch_matmul,
                          depth=model.depth)["total"]


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one ``device`` for MFU, or None (CPU, or a GPU not in :data:`PEAK_FLOPS`).

    The figure is the dense bf16/fp16 tensor-core peak (no sparsity), whatever the run's
    precision: an fp32 run's MFU says how far it is from what the chip could do. The
    environment variable ``PILAMIM_PEAK_FLOPS`` (FLOP/s of one device, e.g. ``989e12``)
    overrides the table, on any device (also a CPU, or a GPU the table lacks, or a
    power-capped one).
    """
    override = os.environ.get(PEAK_FLOPS_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):  # a typo must not log a wrong MFU
            raise ValueError(f"{PEAK_FLOPS_ENV}={override!r} must be a positive number of FLOP/s "
                             "(e.g. 989e12), or unset")
        return value
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """The :data:`PEAK_FLOPS` entry for a CUDA device name (e.g. ``"NVIDIA H100 80GB HBM3"``);
    None when the table lacks it."""
    for key, flops in PEAK_FLOPS:
        if re.search(re.escape(key) + r"(?![0-9A-Za-z])", device_name):
            return flops
    return None

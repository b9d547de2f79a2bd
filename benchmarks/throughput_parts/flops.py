"""FLOPs per image of a training step: analytic from the layer shapes, and counted."""

from __future__ import annotations

import torch


def analytic_flops(size: str, preset: str, img_size: int, patch_size: int, decoder_depth: int,
                   decoder_width: int, mask_ratio: float = 0.75, in_chans: int = 3,
                   sdpa_recompute: bool = False, patch_matmul: bool = True) -> dict[str, float]:
    """FLOPs per image of one training step (fwd + bwd), by part, from the layer shapes.

    Counts matmuls and convolutions only (2 FLOPs per multiply-add), like
    ``torch.utils.flop_counter``. A backward costs twice its forward, except the patch
    embedding (no gradient for the input image: weight gradient only) and the target encoder
    (``no_grad``: forward only). ``sdpa_recompute`` adds what fused attention's backward
    recomputes (the scores: 5 instead of 4 attention matmuls), which is what the flop counter
    charges for ``scaled_dot_product_attention``; the issue's 89.46 GFLOP is without it.
    ``patch_matmul`` (our default) embeds only the visible patches in the encoder; the issue's
    figure embeds all of them (timm's conv, ``patch_matmul=False``), 0.35 GFLOP more.
    """
    from pilamim.model.encoder import ENCODER_SIZES
    from pilamim.model.masking import num_visible
    from pilamim.model.pilamim import PRESETS

    _, dim, depth, _ = ENCODER_SIZES[size]
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


def _flop_counter(**kwargs):
    """``FlopCounterMode`` that also counts CPU fused attention (not in torch's registry)."""
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def fwd(q, k, v, *args, out_shape=None, **kw) -> int:
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kw) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping, **kwargs)

"""The ViT encoder, built by ``timm.create_model`` so an exported encoder loads straight into timm.

Official-code parity (docs/METHOD.md): no qkv bias, learned position embeddings on patches only
(``no_embed_class``), [CLS] prepended after masking, PyTorch default Linear init.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from pilamim.config import ModelParams
from pilamim.model.attention import use_cpu_autocast_attention
from pilamim.model.masking import gather_tokens

# size -> (timm model name, embed_dim, depth, heads). micro/mini are our small CPU sizes.
ENCODER_SIZES: dict[str, tuple[str, int, int, int]] = {
    "micro": ("vit_tiny_patch16_224", 32, 2, 2),
    "mini": ("vit_tiny_patch16_224", 128, 6, 4),
    "tiny": ("vit_tiny_patch16_224", 192, 12, 3),
    "small": ("vit_small_patch16_224", 384, 12, 6),
    "base": ("vit_base_patch16_224", 768, 12, 12),
    "large": ("vit_large_patch16_224", 1024, 24, 16),
}


def encoder_spec(params: ModelParams, in_chans: int) -> tuple[str, dict[str, Any]]:
    """The ``timm.create_model`` name and kwargs that rebuild this encoder anywhere."""
    name, dim, depth, heads = ENCODER_SIZES[params.size]
    depth = params.depth or depth
    kwargs = dict(
        img_size=params.img_size, patch_size=params.patch_size, in_chans=in_chans,
        embed_dim=dim, depth=depth, num_heads=heads, qkv_bias=params.qkv_bias,
        class_token=True, no_embed_class=True, global_pool="token", num_classes=0,
    )
    return name, kwargs


def init_weights(module: nn.Module, scheme: str) -> None:
    """'torch': PyTorch's own Linear/Conv defaults (official code); 'xavier': MAE's init.

    Tokens and position embeddings get trunc-normal(0.02) under both schemes.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            else:
                m.reset_parameters()
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()
    for name, p in module.named_parameters():
        if name.split(".")[-1] in ("cls_token", "pos_embed", "mask_token"):
            nn.init.trunc_normal_(p, std=0.02)


def build_encoder(params: ModelParams, in_chans: int, **overrides: Any) -> nn.Module:
    name, kwargs = encoder_spec(params, in_chans)
    encoder = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
    init_weights(encoder, params.init)
    return use_cpu_autocast_attention(encoder)


def patch_tokens(encoder: nn.Module, images: torch.Tensor,
                 ids_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Patch embeddings plus position embeddings, (B, N or K, D), of the kept patches only when
    ``ids_keep`` is given.

    The patch conv (kernel = stride = patch) is one linear map per patch, so it runs as a matmul
    on gathered pixels: the encoder embeds only the visible quarter, and neither encoder pays
    the conv's NCHW -> NHWC layout conversions on the GPU. The weights stay timm's conv weights.
    """
    embed = encoder.patch_embed
    p = embed.patch_size[0]
    b, c, h, w = images.shape
    pixels = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    pixels = pixels.reshape(b, (h // p) * (w // p), c * p * p)  # (c, row, col): the conv's order
    pos = encoder.pos_embed.expand(b, -1, -1)
    if ids_keep is not None:
        pixels, pos = gather_tokens(pixels, ids_keep), gather_tokens(pos, ids_keep)
    x = nn.functional.linear(pixels, embed.proj.weight.flatten(1), embed.proj.bias)
    return embed.norm(x) + pos


def _with_cls(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


def encode_visible(encoder: nn.Module, images: torch.Tensor, ids_keep: torch.Tensor,
                   patch_matmul: bool = True) -> torch.Tensor:
    """Run only [CLS] + the kept patches through the blocks: (B, 1 + K, D) after the final norm.

    Position embeddings are added before dropping patches, so kept tokens keep their place.
    ``patch_matmul=False`` embeds every patch with timm's conv first (the reference path).
    """
    if patch_matmul:
        x = patch_tokens(encoder, images, ids_keep)
    else:
        x = gather_tokens(encoder.patch_embed(images) + encoder.pos_embed, ids_keep)
    return encoder.norm(encoder.blocks(encoder.norm_pre(_with_cls(encoder, x))))


def encode_full(encoder: nn.Module, images: torch.Tensor,
                patch_matmul: bool = True) -> torch.Tensor:
    """timm's ``forward_features`` (B, 1 + N, D), with the patch embedding as a matmul."""
    if not patch_matmul:
        return encoder.forward_features(images)
    x = _with_cls(encoder, patch_tokens(encoder, images))
    return encoder.norm(encoder.blocks(encoder.norm_pre(x)))

"""The ViT encoder, built by ``timm.create_model`` so an exported encoder loads straight into timm.

Official-code parity (METHOD.md): no qkv bias, learned position embeddings on patches only
(``no_embed_class``), [CLS] prepended after masking, PyTorch default Linear init.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from pilamim.config import ModelParams
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
    return encoder


def encode_visible(encoder: nn.Module, images: torch.Tensor,
                   ids_keep: torch.Tensor) -> torch.Tensor:
    """Run only [CLS] + the kept patches through the blocks: (B, 1 + K, D) after the final norm.

    Position embeddings are added before dropping patches, so kept tokens keep their place.
    """
    x = encoder.patch_embed(images) + encoder.pos_embed
    x = gather_tokens(x, ids_keep)
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return encoder.norm(encoder.blocks(encoder.norm_pre(x)))

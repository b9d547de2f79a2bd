"""timm's attention, with the softmax product in fp32 under CPU bf16 autocast.

Why: on a CPU with native bf16 (AVX512_BF16, AMX) a bf16 matmul runs ~5x faster than an fp32
one, but torch's CPU flash attention is ~6x *slower* in bf16 than in fp32 (its backward ~13x;
4 heads of 32 at 14 and 50 tokens, torch 2.14). Under autocast the qkv and output projections
stay bf16 and only q, k, v are cast to fp32 for ``scaled_dot_product_attention``: the eager
pretraining step is 1.8x faster than fp32 instead of 0.96x (benchmarks/README.md, "CPU step").
On CUDA, and outside autocast, the module is timm's ``Attention`` unchanged, and its state dict
is timm's: an exported encoder still loads into a plain ``timm.create_model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn


class CpuAutocastAttention(Attention):
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or not self.fused_attn:
            return super().forward(x, attn_mask, is_causal)
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float().unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA back to bf16
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def use_cpu_autocast_attention(model: nn.Module) -> nn.Module:
    """Switch every timm ``Attention`` in ``model`` to :class:`CpuAutocastAttention` in place
    (same parameters and state dict); returns ``model``."""
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = CpuAutocastAttention
    return model

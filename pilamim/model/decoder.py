"""A masked-token decoder; the pixel and the latent decoder differ only in their head width."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pilamim.model.attention import use_cpu_autocast_attention
from pilamim.model.masking import gather_tokens


class MaskedDecoder(nn.Module):
    """Embeds encoder outputs, fills dropped positions with a mask token, restores raster order,
    adds its own position embedding over 1 + N slots ([CLS] first) and predicts every slot.
    """

    def __init__(self, encoder_dim: int, dim: int, depth: int, heads: int, num_patches: int,
                 out_dim: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=qkv_bias) for _ in range(depth)])
        self.head = nn.Linear(dim, out_dim)
        use_cpu_autocast_attention(self.blocks)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, E) encoder tokens -> (B, 1 + N, out_dim) in raster order, [CLS] first."""
        x = self.embed(tokens)
        cls, visible = x[:, :1], x[:, 1:]
        batch, num_patches = ids_restore.shape
        fill = self.mask_token.expand(batch, num_patches - visible.shape[1], -1)
        patches = gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)
        x = torch.cat([cls, patches], dim=1) + self.pos_embed
        return self.head(self.blocks(x))

"""PiLaMIM: one encoder, a pixel decoder and a latent decoder, [CLS] in the reconstruction.

Presets switch branches on and off; a disabled branch is not built and costs nothing, which is
how the paper's baselines (MAE, latent-only) come out of the same code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pilamim.config import ModelParams
from pilamim.model.decoder import MaskedDecoder
from pilamim.model.encoder import (
    build_encoder,
    encode_full,
    encode_visible,
    encoder_spec,
    init_weights,
)
from pilamim.model.losses import cls_mse, masked_mse, normalize_patches
from pilamim.model.masking import Mask, num_visible, patchify, random_mask


@dataclass(frozen=True)
class LossWeights:
    pixel: float
    latent: float
    cls: float

    @property
    def needs_target(self) -> bool:
        return self.latent > 0 or self.cls > 0


PRESETS: dict[str, LossWeights] = {
    "pilamim": LossWeights(1.0, 1.0, 1.0),
    "pilamim_nocls": LossWeights(1.0, 1.0, 0.0),
    "mae": LossWeights(1.0, 0.0, 0.0),
    "latent": LossWeights(0.0, 1.0, 0.0),
    "latent_cls": LossWeights(0.0, 1.0, 1.0),
}


@dataclass
class PiLaMIMOutput:
    loss: torch.Tensor
    loss_pixel: torch.Tensor | None
    loss_latent: torch.Tensor | None
    loss_cls: torch.Tensor | None
    pred_pixels: torch.Tensor | None  # (B, N, p*p*C), for reconstruction figures
    mask: torch.Tensor  # (B, N), 1 = masked
    feature_std: torch.Tensor  # std of the encoder's outputs across the batch: collapse guard


class PiLaMIM(nn.Module):
    # Patch embedding as a matmul on gathered pixels (same function as timm's conv, faster on
    # GPUs); False runs timm's conv, which the benchmark times side by side.
    patch_matmul: bool = True

    def __init__(self, params: ModelParams, in_chans: int) -> None:
        super().__init__()
        self.params = params
        preset = PRESETS[params.preset]
        self.weights = LossWeights(preset.pixel, preset.latent * params.latent_weight,
                                   preset.cls * params.latent_weight * params.cls_weight)
        self.in_chans = in_chans
        self.encoder = build_encoder(params, in_chans)
        self.num_patches = self.encoder.patch_embed.num_patches
        self.keep = num_visible(self.num_patches, params.mask_ratio)
        dim = self.encoder.embed_dim

        def decoder(out_dim: int) -> MaskedDecoder:
            d = MaskedDecoder(dim, params.decoder_width, params.decoder_depth,
                              params.decoder_heads, self.num_patches, out_dim, params.qkv_bias)
            init_weights(d, params.init)
            return d

        self.pixel_decoder = (decoder(params.patch_size**2 * in_chans)
                              if self.weights.pixel > 0 else None)
        self.latent_decoder = decoder(dim) if self.weights.needs_target else None
        self.target = None
        if self.weights.needs_target:
            if params.target_init == "copy":
                self.target = copy.deepcopy(self.encoder)
            else:
                self.target = build_encoder(params, in_chans)
            self.target.requires_grad_(False)

    def encoder_spec(self) -> tuple[str, dict]:
        return encoder_spec(self.params, self.in_chans)

    def draw_mask(self, noise: torch.Tensor) -> Mask:
        return random_mask(noise, self.keep)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> PiLaMIMOutput:
        """One pretraining forward pass; ``noise`` (B, N) uniform decides the mask."""
        if noise is None:
            noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
        mask = self.draw_mask(noise)
        tokens = encode_visible(self.encoder, images, mask.ids_keep, self.patch_matmul)
        zero = tokens.new_zeros((), dtype=torch.float32)
        loss, loss_pixel, loss_latent, loss_cls, pred_pixels = zero, None, None, None, None

        if self.pixel_decoder is not None:
            pred_pixels = self.pixel_decoder(tokens, mask.ids_restore)[:, 1:]
            target = patchify(images, self.params.patch_size)
            if self.params.norm_pix_loss:
                target = normalize_patches(target)
            loss_pixel = masked_mse(pred_pixels, target, mask.mask)
            loss = loss + self.weights.pixel * loss_pixel

        if self.latent_decoder is not None:
            target_cls, target_patches = self.latent_targets(images)
            pred = self.latent_decoder(tokens, mask.ids_restore)
            loss_latent = masked_mse(pred[:, 1:], target_patches, mask.mask)
            loss_cls = cls_mse(pred[:, 0], target_cls)
            loss = loss + self.weights.latent * loss_latent + self.weights.cls * loss_cls

        feature_std = tokens.detach().float().std(dim=0, correction=0).mean()
        return PiLaMIMOutput(loss, loss_pixel, loss_latent, loss_cls, pred_pixels, mask.mask,
                             feature_std)

    @torch.no_grad()
    def latent_targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target encoder on the full image: [CLS] (B, D) and patches (B, N, D), raster order.

        The official code leaves these patch tokens shuffled (its bug); we keep patch p at p.
        """
        self.target.eval()
        tokens = encode_full(self.target, images, self.patch_matmul)
        if self.params.latent_target_norm == "layer_norm":
            tokens = F.layer_norm(tokens.float(), tokens.shape[-1:])
        patches = tokens[:, 1:]
        if self.params.target_token_order == "shuffled":
            patches = self._official_shuffle(patches)
        return tokens[:, 0], patches

    @staticmethod
    def _official_shuffle(target_patches: torch.Tensor) -> torch.Tensor:
        """The official code's bug, for ablations: target tokens left in a random order."""
        batch, num_patches, _ = target_patches.shape
        perm = torch.argsort(torch.rand(batch, num_patches, device=target_patches.device), dim=1)
        return torch.gather(target_patches, 1,
                            perm.unsqueeze(-1).expand(-1, -1, target_patches.shape[-1]))

    @torch.no_grad()
    def update_target(self, momentum: float | torch.Tensor) -> None:
        """EMA step θ_t ← m·θ_t + (1−m)·θ, fused over all tensors (one kernel per group)."""
        if self.target is None:
            return
        target = [p for p in self.target.parameters()]
        online = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_lerp_(target, online, 1.0 - momentum)


def build_pilamim(params: ModelParams, in_chans: int) -> PiLaMIM:
    return PiLaMIM(params, in_chans)

"""The PiLaMIM model: a timm ViT encoder, an EMA target, pixel and latent decoders."""

from pilamim.model.encoder import build_encoder, encoder_spec
from pilamim.model.pilamim import PRESETS, PiLaMIM, PiLaMIMOutput, build_pilamim

__all__ = ["PRESETS", "PiLaMIM", "PiLaMIMOutput", "build_encoder", "build_pilamim",
           "encoder_spec"]

"""PiLaMIM: pixel + latent masked image modeling for Vision Transformers."""

__version__ = "0.1.0"

"""Pretraining: optimizer groups, sampling, checkpoints, the loop."""

from pilamim.train.loop import NonFiniteLossError, pretrain

__all__ = ["NonFiniteLossError", "pretrain"]

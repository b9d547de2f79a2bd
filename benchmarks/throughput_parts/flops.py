"""FLOPs per image of a training step: analytic from the layer shapes, and counted.

The analytic count lives in the library (:mod:`pilamim.train.flops`: the pretraining loop logs
MFU from it); it is re-exported here for the benchmark, which checks it against the counter.
"""

from __future__ import annotations

import torch

from pilamim.train.flops import analytic_flops

__all__ = ["flop_counter", "analytic_flops"]


def flop_counter(**kwargs):
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

"""Encoder export: a plain timm state dict plus the ``timm.create_model`` call that rebuilds it.

Anyone with timm can load our encoder without installing pilamim:
``timm.create_model(spec["model_name"], **spec["kwargs"])`` then ``load_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pilamim.io import OutputBatch
from pilamim.model.attention import use_cpu_autocast_attention

WEIGHTS = "encoder.safetensors"
SPEC = "encoder.json"
# Keys a changed pooling/head legitimately leaves out (fine-tuning with global_pool="avg").
_HEAD_KEYS = ("head.", "fc_norm.", "norm.")


def export_encoder(encoder: nn.Module, model_name: str, kwargs: dict[str, Any],
                   out_dir: str | Path, extra: dict[str, Any] | None = None,
                   stem: str = "encoder", batch: OutputBatch | None = None) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` into ``out_dir``, both or neither.

    With ``batch`` the two files are only staged: they appear when the caller commits it with
    the stage's other outputs (its metrics JSON last), so a failure later in the stage leaves
    the previous export in place. Without, they are committed here, the spec last (readers
    look for it first).
    """
    out = Path(out_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in encoder.state_dict().items()}
    spec = {"model_name": model_name, "kwargs": kwargs, "feature_dim": encoder.embed_dim,
            "img_size": kwargs["img_size"], "in_chans": kwargs["in_chans"], **(extra or {})}
    staging = batch if batch is not None else OutputBatch()
    try:
        staging.write(out / f"{stem}.safetensors", lambda tmp: save_file(state, str(tmp)))
        staging.write_json(out / f"{stem}.json", spec)
        if batch is None:
            staging.commit()
    except BaseException:
        staging.discard()  # the stage failed: none of its staged outputs may appear
        raise
    return out


def read_spec(encoder_dir: str | Path) -> dict[str, Any]:
    path = Path(encoder_dir) / SPEC
    if not path.exists() or not (Path(encoder_dir) / WEIGHTS).exists():
        raise FileNotFoundError(
            f"no exported encoder in {encoder_dir} (need {SPEC} and {WEIGHTS}); "
            "run `pilamim pretrain` first"
        )
    return json.loads(path.read_text())


def load_encoder(encoder_dir: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild the exported encoder with timm; ``overrides`` change timm kwargs (e.g. a head).

    Without overrides every key must match. With overrides only head/norm keys may differ,
    anything else is an error: a silently half-loaded encoder would poison every result.
    """
    spec = read_spec(encoder_dir)
    model = timm.create_model(spec["model_name"], pretrained=False,
                              **{**spec["kwargs"], **overrides})
    state = load_file(str(Path(encoder_dir) / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in [*missing, *unexpected] if not (overrides and k.startswith(_HEAD_KEYS))]
    if bad:
        raise RuntimeError(
            f"encoder in {encoder_dir} does not match {spec['model_name']} with its kwargs: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}; re-export it with "
            "`pilamim pretrain`"
        )
    return use_cpu_autocast_attention(model)

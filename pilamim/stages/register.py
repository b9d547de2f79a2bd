"""Stage ``register``: log the encoder as an MLflow model, register it, run the promotion gate."""

from __future__ import annotations

from typing import Any

from pilamim.callbacks import Logger
from pilamim.config import Params


def inputs(params: Params) -> dict[str, str]:
    r = params.register
    return {f"{r.encoder_dir}/encoder.json": "pretrain", r.probe_metrics: "probe",
            r.finetune_metrics: "finetune"}


def data_dir(params: Params) -> str | None:
    return params.register.data_dir


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    from pilamim.registry import register  # mlflow is heavy: only this stage needs it here

    return register(params)

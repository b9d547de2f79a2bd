"""Stage ``finetune``: end-to-end fine-tuning (MAE protocol) of the pretrained encoder."""

from __future__ import annotations

from typing import Any

import torch

from pilamim.callbacks import Logger, NullLogger
from pilamim.config import Params
from pilamim.data.dataset import ManifestDataset
from pilamim.data.prepared import load_prepared
from pilamim.device import resolve_device
from pilamim.evaluate.finetune import finetune_transform, run_finetune
from pilamim.evaluate.metrics import write_metrics_json
from pilamim.model.export import read_spec


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    p = params.finetune
    logger = logger or NullLogger()
    torch.manual_seed(p.seed)
    prepared = load_prepared(p.data_dir)
    size = read_spec(p.encoder_dir)["img_size"]

    def dataset(split: str, train: bool) -> ManifestDataset:
        tf = finetune_transform(size, prepared.mean, prepared.std, p, train=train)
        return ManifestDataset(prepared, split, tf)

    evals = {s: dataset(s, False) for s in ("val", "test") if prepared.split(s)}
    metrics, _model = run_finetune(p.encoder_dir, dataset("train", True), evals,
                                   prepared.classes, p, resolve_device(p.device), logger)
    metrics["dataset_digest"] = prepared.digest
    write_metrics_json(p.metrics_path, metrics)
    return metrics

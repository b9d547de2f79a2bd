"""The evaluation every entry gets: linear probe + kNN (class and low-level), fine-tune.

Features are extracted once per encoder from the cached eval images, then the library's own
:func:`run_linear_probe` trains its head on them through an identity "encoder" — the same
head, LARS optimizer, schedule and kNN as ``pilamim probe``, and the same code path for the
raw-pixel floor, whose features are the flattened normalised images.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from pilamim.config import Params
from pilamim.data.prepared import PreparedDataset
from pilamim.device import autocast_dtype
from pilamim.evaluate.features import extract_features
from pilamim.evaluate.finetune import run_finetune
from pilamim.evaluate.linear_probe import run_linear_probe
from pilamim.loggers import Logger, NullLogger
from pilamim.model.export import load_encoder, read_spec
from pilamim.stages.finetune import finetune_dataset

from .lowlevel import LOWLEVEL_CLASSES, EvalImages

KEPT = ("top1", "top5", "knn_top1", "knn_top5")


class RenamingLogger:
    """Forwards to ``inner`` with metric prefix ``old`` replaced by ``new`` (no collisions
    between the class probe and the low-level probe in one MLflow run)."""

    def __init__(self, inner: Logger, old: str, new: str) -> None:
        self.inner, self.old, self.new = inner, old, new

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log_metrics({(self.new + k[len(self.old):] if k.startswith(self.old) else k): v
                                for k, v in metrics.items()}, step)

    def log_artifact(self, path: Path) -> None:
        self.inner.log_artifact(path)


def encoder_features(encoder_dir: str | Path, data: EvalImages, params: Params,
                     device: torch.device) -> dict[str, Tensor]:
    """[CLS] features of every split from the exported encoder (as ``pilamim probe`` reads)."""
    encoder = load_encoder(encoder_dir)
    dtype = autocast_dtype(device, params.probe.precision)
    return {s: extract_features(encoder, TensorDataset(x, data.labels[s]), params.probe.batch_size,
                                device, dtype=dtype, desc=f"features {s}")[0]
            for s, x in data.images.items()}


def probe(features: Mapping[str, Tensor], labels: Mapping[str, Tensor], classes: list[str],
          params: Params, device: torch.device, logger: Logger) -> dict[str, Any]:
    """Linear probe + kNN on cached features; reported split is 'test'."""
    train = TensorDataset(features["train"], labels["train"])
    evals = {s: TensorDataset(features[s], labels[s]) for s in ("val", "test") if s in features}
    result = run_linear_probe(nn.Identity(), train, evals, classes, params.probe, device, logger)
    kept = {k: result[k] for k in KEPT if k in result}
    if "val" in result:
        kept.update({f"val_{k}": result["val"][k] for k in KEPT if k in result["val"]})
    kept.update(feature_dim=result["feature_dim"], steps=result["steps"], lr=result["lr"],
                base_lr=result["base_lr"], weight_decay=result["weight_decay"])
    return kept


def finetune_encoder(encoder_dir: str | Path, prepared: PreparedDataset, params: Params,
                     device: torch.device, logger: Logger) -> dict[str, Any]:
    """MAE-protocol fine-tuning through the library (the datasets ``pilamim finetune`` reads:
    in memory where that gives the same images)."""
    p = params.finetune
    size = read_spec(encoder_dir)["img_size"]

    def dataset(split: str, train: bool) -> Dataset:
        return finetune_dataset(prepared, split, size, p, train)

    train, evals = dataset("train", True), {s: dataset(s, False) for s in ("val", "test")
                                            if prepared.split(s)}
    result, _model = run_finetune(encoder_dir, train, evals, prepared.classes, p, device, logger)
    kept = {k: result[k] for k in ("top1", "top5")}
    if "val" in result:
        kept.update(val_top1=result["val"]["top1"])
    return kept


def evaluate(features: Mapping[str, Tensor], data: EvalImages, prepared: PreparedDataset,
             params: Params, device: torch.device, encoder_dir: str | Path | None,
             logger: Logger | None = None, *, finetune: bool = True,
             ) -> tuple[dict[str, Any], dict[str, float]]:
    """All protocols for one entry; returns (details per protocol, seconds per protocol).

    Fine-tuning runs when ``finetune`` is set and there is an encoder (``encoder_dir`` None
    is the raw-pixel floor).
    """
    logger = logger or NullLogger()
    details: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    details["probe"] = probe(features, data.labels, prepared.classes, params, device, logger)
    details["lowlevel"] = probe(features, data.bins, LOWLEVEL_CLASSES, params, device,
                                RenamingLogger(logger, "probe/", "lowlevel/"))
    seconds["probe_s"] = time.perf_counter() - t
    if finetune and encoder_dir is not None:
        t = time.perf_counter()
        details["finetune"] = finetune_encoder(encoder_dir, prepared, params, device, logger)
        seconds["finetune_s"] = time.perf_counter() - t
    return details, seconds


def headline(details: Mapping[str, Any]) -> dict[str, float | None]:
    """The report's metrics (fractions in [0, 1]; None where a protocol does not apply)."""
    ft = details.get("finetune")
    return {
        "probe_top1": details["probe"]["top1"],
        "knn_top1": details["probe"].get("knn_top1"),
        "finetune_top1": ft["top1"] if ft else None,
        "lowlevel_top1": details["lowlevel"]["top1"],
        "lowlevel_knn_top1": details["lowlevel"].get("knn_top1"),
    }

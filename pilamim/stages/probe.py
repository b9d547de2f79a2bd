"""Stage ``probe``: linear probe (paper protocol) and kNN on the frozen online encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pilamim.callbacks import CSVLogger, Logger, MultiLogger, NullLogger
from pilamim.config import Params
from pilamim.data.dataset import ManifestDataset
from pilamim.data.prepared import load_prepared
from pilamim.data.transforms import eval_transform, pretrain_transform
from pilamim.device import resolve_device
from pilamim.evaluate.linear_probe import run_linear_probe
from pilamim.evaluate.metrics import save_eval_outputs
from pilamim.model.export import load_encoder, read_spec
from pilamim.recipes import auto_crop_scale

CURVE_COLUMNS = ("train_loss", "lr", "val_top1", "val_top5")


def inputs(params: Params) -> dict[str, str]:
    p = params.probe
    return {f"{p.data_dir}/manifest.csv": "prepare", f"{p.encoder_dir}/encoder.json": "pretrain"}


def data_dir(params: Params) -> str | None:
    return params.probe.data_dir


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    p = params.probe
    logger = logger or NullLogger()
    torch.manual_seed(p.seed)
    prepared = load_prepared(p.data_dir)
    spec = read_spec(p.encoder_dir)
    encoder = load_encoder(p.encoder_dir)
    size = spec["img_size"]
    plain = eval_transform(size, prepared.mean, prepared.std)
    train_tf = (pretrain_transform(size, prepared.mean, prepared.std, auto_crop_scale(size))
                if p.augment else plain)
    train = ManifestDataset(prepared, "train", train_tf)
    evals = {s: ManifestDataset(prepared, s, plain) for s in ("val", "test") if prepared.split(s)}
    out = Path(p.out_dir)
    # kNN needs un-augmented training features as its memory bank.
    knn_bank = ManifestDataset(prepared, "train", plain) if p.augment else None
    curve = CSVLogger(p.plots_path, CURVE_COLUMNS, step_name="epoch", prefix="probe/")
    metrics = run_linear_probe(encoder, train, evals, prepared.classes, p,
                               resolve_device(p.device), MultiLogger(curve, logger),
                               knn_train_ds=knn_bank, head_path=out / "head.pt")
    save_eval_outputs(metrics, prepared.classes, prepared.digest, out, p.metrics_path,
                      p.plots_path, logger)
    return metrics

"""Stage ``probe``: linear probe (paper protocol) and kNN on the frozen online encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pilamim.config import Params
from pilamim.data.dataset import ManifestDataset
from pilamim.data.memory_split import eval_dataset
from pilamim.data.prepared import load_prepared
from pilamim.data.shard_reader import verify_shards
from pilamim.data.transforms import pretrain_transform
from pilamim.device import resolve_device
from pilamim.evaluate.linear_probe import run_linear_probe
from pilamim.evaluate.metrics import save_eval_outputs
from pilamim.io import OutputBatch, ensure_writable
from pilamim.loggers import CSVLogger, Logger, MultiLogger, NullLogger
from pilamim.model.export import load_encoder, read_spec
from pilamim.recipes import auto_crop_scale
from pilamim.stages.lineage import LINEAGE_KEY, check_encoder_fits_data, eval_lineage

CURVE_COLUMNS = ("train_loss", "lr", "val_top1", "val_top5")


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    p = params.probe
    ensure_writable([p.out_dir, Path(p.metrics_path).parent, Path(p.plots_path).parent])
    logger = logger or NullLogger()
    torch.manual_seed(p.seed)
    prepared = load_prepared(p.data_dir)
    # A changed or truncated shard fails here, before any training; only augmented training
    # images are read in a shuffled order (features are extracted in order).
    verify_shards(prepared, shuffled={"train": None} if p.augment else None)
    spec = read_spec(p.encoder_dir)
    check_encoder_fits_data(spec, p.encoder_dir, prepared.digest, prepared.channels, p.data_dir,
                            "probe")
    lineage = eval_lineage("probe", p, prepared.digest, p.encoder_dir)  # what gets loaded
    encoder = load_encoder(p.encoder_dir)
    size = spec["img_size"]
    train = (ManifestDataset(prepared, "train", pretrain_transform(
        size, prepared.mean, prepared.std, auto_crop_scale(size)))
        if p.augment else eval_dataset(prepared, "train", size))
    evals = {s: eval_dataset(prepared, s, size) for s in ("val", "test") if prepared.split(s)}
    out = Path(p.out_dir)
    # kNN needs un-augmented training features as its memory bank.
    knn_bank = eval_dataset(prepared, "train", size) if p.augment else None
    curve = CSVLogger(p.plots_path, CURVE_COLUMNS, step_name="epoch", prefix="probe/")
    with OutputBatch() as batch:  # head, report and metrics appear together or not at all
        metrics = run_linear_probe(encoder, train, evals, prepared.classes, p,
                                   resolve_device(p.device), MultiLogger(curve, logger),
                                   knn_train_ds=knn_bank, head_path=out / "head.pt",
                                   outputs=batch)
        metrics[LINEAGE_KEY] = lineage
        save_eval_outputs(metrics, prepared.classes, prepared.digest, out, p.metrics_path,
                          p.plots_path, logger, batch=batch)
    return metrics

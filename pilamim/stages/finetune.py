"""Stage ``finetune``: end-to-end fine-tuning (MAE protocol) of the pretrained encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pilamim.config import Params
from pilamim.data.dataset import ManifestDataset
from pilamim.data.prepared import load_prepared
from pilamim.data.shard_reader import verify_shards
from pilamim.device import resolve_device
from pilamim.evaluate.finetune import finetune_transform, run_finetune
from pilamim.evaluate.metrics import save_eval_outputs
from pilamim.io import OutputBatch, ensure_writable
from pilamim.loggers import CSVLogger, Logger, MultiLogger, NullLogger
from pilamim.model.export import export_encoder, read_spec
from pilamim.stages.lineage import LINEAGE_KEY, check_encoder_fits_data, eval_lineage

CURVE_COLUMNS = ("train_loss", "lr", "val_top1", "val_top5")


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    p = params.finetune
    ensure_writable([p.out_dir, Path(p.metrics_path).parent, Path(p.plots_path).parent])
    logger = logger or NullLogger()
    torch.manual_seed(p.seed)
    prepared = load_prepared(p.data_dir)
    # A changed or truncated shard (or an S3 cache too small for the shuffle) fails here,
    # before any training.
    verify_shards(prepared, shuffled={"train": p.shuffle_window_chunks},
                  window_setting="finetune.shuffle_window_chunks")
    spec = read_spec(p.encoder_dir)
    check_encoder_fits_data(spec, p.encoder_dir, prepared.digest, prepared.channels, p.data_dir,
                            "finetune")
    lineage = eval_lineage("finetune", p, prepared.digest, p.encoder_dir)  # what gets loaded

    def dataset(split: str, train: bool) -> ManifestDataset:
        tf = finetune_transform(spec["img_size"], prepared.mean, prepared.std, p, train=train)
        return ManifestDataset(prepared, split, tf)

    evals = {s: dataset(s, False) for s in ("val", "test") if prepared.split(s)}
    curve = CSVLogger(p.plots_path, CURVE_COLUMNS, step_name="epoch", prefix="finetune/")
    metrics, model = run_finetune(p.encoder_dir, dataset("train", True), evals,
                                  prepared.classes, p, resolve_device(p.device),
                                  MultiLogger(curve, logger))
    metrics[LINEAGE_KEY] = lineage
    out = Path(p.out_dir)
    kwargs = {**spec["kwargs"], "num_classes": len(prepared.classes),
              "global_pool": p.global_pool}
    with OutputBatch() as batch:  # classifier, report and metrics appear together or not at all
        export_encoder(model, spec["model_name"], kwargs, out, stem="classifier",
                       extra={"classes": prepared.classes, "mean": list(prepared.mean),
                              "std": list(prepared.std)}, batch=batch)
        save_eval_outputs(metrics, prepared.classes, prepared.digest, out, p.metrics_path,
                          p.plots_path, logger, batch=batch)
    return metrics

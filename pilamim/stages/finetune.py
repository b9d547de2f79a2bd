"""Stage ``finetune``: end-to-end fine-tuning (MAE protocol) of the pretrained encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pilamim.config import FinetuneParams, Params
from pilamim.data.dataset import ManifestDataset
from pilamim.data.memory_split import memory_split
from pilamim.data.prepared import PreparedDataset, load_prepared
from pilamim.data.shard_reader import verify_shards
from pilamim.data.transforms import EVAL_RESIZE_MIN
from pilamim.device import resolve_device
from pilamim.evaluate.finetune import finetune_transform, run_finetune
from pilamim.evaluate.metrics import save_eval_outputs
from pilamim.io import OutputBatch, ensure_writable
from pilamim.loggers import CSVLogger, Logger, MultiLogger, NullLogger
from pilamim.model.export import export_encoder, read_spec
from pilamim.recipes import resolve_crop_scale, uses_mae_regularisation
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

    evals = {s: finetune_dataset(prepared, s, spec["img_size"], p, train=False)
             for s in ("val", "test") if prepared.split(s)}
    curve = CSVLogger(p.plots_path, CURVE_COLUMNS, step_name="epoch", prefix="finetune/")
    train = finetune_dataset(prepared, "train", spec["img_size"], p, train=True)
    metrics, model = run_finetune(p.encoder_dir, train, evals,
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


def finetune_dataset(prepared: PreparedDataset, split: str, img_size: int,
                     params: FinetuneParams, train: bool) -> Dataset:
    """A split as fine-tuning reads it: in memory (:mod:`pilamim.data.memory_split`) where that
    gives timm's transform's images -- every image ``img_size`` square, below 64 px, a
    ``(1, 1)`` crop scale and no RandAugment or erasing ('light' regularisation), leaving a
    horizontal flip, and a whole-split shuffle -- else through timm's per-image transform
    (``input_pipeline: pil``)."""
    tf = finetune_transform(img_size, prepared.mean, prepared.std, params, train=train)
    source = ManifestDataset(prepared, split, tf)
    plain = (img_size < EVAL_RESIZE_MIN
             and resolve_crop_scale(params.crop_scale, img_size) == (1.0, 1.0)
             and not (train and uses_mae_regularisation(params.regularisation, params.epochs))
             and not (train and params.shuffle_window_chunks is not None))
    in_memory = None
    if params.input_pipeline != "pil" and plain:
        in_memory = memory_split(source, img_size, prepared.mean, prepared.std,
                                 hflip=0.5 if train else 0.0)
    if in_memory is None and params.input_pipeline == "memory":
        raise ValueError(
            f"finetune.input_pipeline: memory needs every {split} image {img_size} px square "
            f"(below {EVAL_RESIZE_MIN} px), crop_scale (1, 1) and regularisation 'light' "
            "(no RandAugment or erasing); set input_pipeline: pil (or auto)")
    return source if in_memory is None else in_memory

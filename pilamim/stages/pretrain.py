"""Stage ``pretrain``: PiLaMIM pretraining, resumable; exports the encoder; loss curve CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pilamim.config import Params
from pilamim.loggers import CSVLogger, Logger, MultiLogger, NullLogger
from pilamim.train import pretrain
from pilamim.train.distributed import launch_rank
from pilamim.train.loop import resume_step

CURVE_COLUMNS = ("loss", "loss_pixel", "loss_latent", "loss_cls", "lr", "feature_std")
KNN_COLUMNS = ("knn_top1", "knn_top5")


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    p = params.pretrain
    out = Path(p.out_dir)
    # Under torchrun only rank 0 writes rows; any other rank rewriting the file would race it.
    curves: list[Logger] = []
    if launch_rank() == 0:
        resume = resume_step(params)
        curves = [CSVLogger(p.plots_path, CURVE_COLUMNS, prefix="pretrain/",
                            resume_from_step=resume),
                  CSVLogger(p.knn_plots_path, KNN_COLUMNS, prefix="pretrain/",
                            resume_from_step=resume)]
    summary = pretrain(params, MultiLogger(*curves, logger or NullLogger()))
    if logger is not None:
        for path in (Path(p.plots_path), Path(p.knn_plots_path), out / "encoder.json",
                     Path(p.metrics_path)):
            if path.exists():
                logger.log_artifact(path)
    return summary

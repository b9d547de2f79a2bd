"""Classification metrics shared by the linear probe, kNN and fine-tuning.

Accuracies are fractions in [0, 1]. Everything returned is plain Python (floats, ints, lists)
so it goes straight into ``metrics/*.json`` and MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pilamim.io import OutputBatch, atomic_write
from pilamim.loggers import Logger


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores (k capped at C)."""
    if labels.numel() == 0:
        return 0.0
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels.view(-1, 1)).any(dim=1).float().mean().item()


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """[C, C] counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(logits: Tensor, labels: Tensor,
                           classes: Sequence[str]) -> dict[str, Any]:
    """top-1, top-k (k = min(5, C)), per-class accuracy and the confusion matrix.

    ``per_class_accuracy`` is ``None`` for a class with no samples (JSON has no NaN).
    """
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    num_classes = len(classes)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match {num_classes} classes")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {labels.shape[0]} labels")
    matrix = confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    support = matrix.sum(dim=1)
    correct = matrix.diag()
    per_class = {
        name: (correct[i].item() / support[i].item() if support[i] > 0 else None)
        for i, name in enumerate(classes)
    }
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "num_samples": int(labels.numel()),
    }


def save_confusion_matrix_png(matrix: Sequence[Sequence[int]] | Tensor, classes: Sequence[str],
                              path: str | Path, batch: OutputBatch | None = None) -> Path:
    """Row-normalised heat map with counts; rendered off-screen (Agg), written atomically
    (with ``batch``: staged in it, to appear when the caller commits)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.as_tensor(matrix, dtype=torch.float64)
    rows = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    frac = (counts / rows).numpy()
    n = len(classes)
    side = max(4.0, 0.45 * n + 2.0)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes), rotation=90)
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    write = (batch.write if batch is not None else atomic_write)
    return write(path, lambda tmp: fig.savefig(tmp, format="png"))


def summary_scalars(result: dict) -> dict[str, Any]:
    """The numbers worth a metrics file (what ``dvc metrics show`` prints): top-level scalars
    and each split's top-k/loss as ``<split>_<key>``; tables and matrices stay in the report.
    A ``lineage`` block (which data, encoder and protocol; :mod:`pilamim.stages.lineage`) is
    kept too: the numbers mean nothing without it, and ``register`` checks it."""
    out: dict[str, Any] = {k: v for k, v in result.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)}
    if isinstance(result.get("lineage"), dict):
        out["lineage"] = result["lineage"]
    for split, values in result.items():
        if isinstance(values, dict) and "top1" in values:
            out.update({f"{split}_{k}": v for k, v in values.items()
                        if k in ("top1", "top5", "loss", "knn_top1", "knn_top5")})
    return out


def save_eval_outputs(metrics: dict[str, Any], classes: Sequence[str], dataset_digest: str,
                      out_dir: str | Path, metrics_path: str | Path, plots_path: str | Path,
                      logger: Logger, batch: OutputBatch | None = None) -> None:
    """What every evaluation stage leaves behind, all of it or none, then logged as artifacts.

    ``<out_dir>/report.json`` keeps everything (per-class accuracy, confusion matrices) and
    ``metrics_path`` the scalars DVC compares; the test split's confusion matrix becomes a PNG.
    The digest ties the numbers to the data version they were measured on.

    Every file is written to a temp name first and renamed into place only when all are
    written, ``metrics_path`` last: a failure midway (a read-only ``metrics/``, a full disk)
    leaves the previous outputs as they were, never a new report beside old metrics. A stage
    that writes model files too stages them in ``batch`` first (``export_encoder(...,
    batch=batch)``); they are committed here with the rest.
    """
    out = Path(out_dir)
    metrics["dataset_digest"] = dataset_digest
    ours: list[Path] = []
    staging = batch if batch is not None else OutputBatch()
    try:
        if "test" in metrics:
            ours.append(save_confusion_matrix_png(metrics["test"]["confusion_matrix"], classes,
                                                  out / "confusion_matrix.png", batch=staging))
        ours.append(staging.write_json(out / "report.json", metrics))
        ours.append(staging.write_json(metrics_path, summary_scalars(metrics)))
        staging.commit()
    except BaseException:
        staging.discard()  # temp files go; every previous output stays as it was
        raise
    for path in [*ours, Path(plots_path)]:
        logger.log_artifact(path)

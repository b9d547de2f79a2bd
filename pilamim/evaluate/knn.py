"""Weighted cosine kNN classifier (DINO-style): cheap monitor of representation quality.

Each query's ``k`` most similar training features vote for their label with weight
``exp(cos_sim / T)``. Pixel-only models score low here at short schedules, so never gate a
model on kNN alone (docs/METHOD.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pilamim.evaluate.features import extract_features
from pilamim.evaluate.metrics import classification_metrics, topk_accuracy


def knn_classify(train_feats: Tensor, train_labels: Tensor, query_feats: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> Tensor:
    """Class scores [Nq, C] for each query; queries are processed ``chunk`` at a time.

    Memory is bounded by ``chunk x N_train`` similarities, not ``N_query x N_train``.
    """
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=1)
    bank_labels = train_labels.long().to(bank.device)
    scores = []
    for start in range(0, query_feats.shape[0], chunk):
        query = F.normalize(query_feats[start:start + chunk].float().to(bank.device), dim=1)
        sims, idx = (query @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes)
    return torch.cat(scores).cpu()


def knn_metrics(train_feats: Tensor, train_labels: Tensor, query_feats: Tensor,
                query_labels: Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> dict[str, float]:
    """``knn_top1`` / ``knn_top5`` (top-k capped at C) from cached features."""
    scores = knn_classify(train_feats, train_labels, query_feats, num_classes, k, temperature)
    labels = query_labels.long().cpu()
    return {"knn_top1": topk_accuracy(scores, labels, 1),
            "knn_top5": topk_accuracy(scores, labels, 5)}


def run_knn(encoder: nn.Module, memory_ds: Dataset, query_ds: Dataset,
            classes: Sequence[str], *, k: int = 20, temperature: float = 0.07,
            batch_size: int = 256, device: torch.device | str = "cpu", num_workers: int = 0,
            dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Extract features of both sets with the frozen encoder and score kNN on ``query_ds``.

    Returns ``knn_top1``/``knn_top5`` plus the full classification metrics of the vote
    (``top1``, ``top5``, ``per_class_accuracy``, ``confusion_matrix``, ``num_samples``).
    """
    train_f, train_y = extract_features(encoder, memory_ds, batch_size, device, num_workers,
                                        dtype, desc="knn memory")
    query_f, query_y = extract_features(encoder, query_ds, batch_size, device, num_workers,
                                        dtype, desc="knn query")
    scores = knn_classify(train_f, train_y, query_f, len(classes), k, temperature)
    metrics = classification_metrics(scores, query_y, classes)
    return {"knn_top1": metrics["top1"], "knn_top5": metrics["top5"], **metrics}

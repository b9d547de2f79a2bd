"""Linear probe, paper protocol: frozen encoder -> [CLS] -> BatchNorm (no affine) -> Linear.

LARS (timm) with momentum 0.9, lr = base_lr x batch / 256, linear warm-up then cosine, set per
iteration; base lr and weight decay are chosen on the val split from a small grid. Without
augmentation (small images) the encoder runs once and the heads train on cached features,
which is what makes 100 epochs per candidate cheap; with augmentation the frozen encoder runs
on every augmented batch, for every candidate.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from pilamim.config import ProbeParams
from pilamim.data.progress import EpochLines
from pilamim.device import autocast, autocast_dtype
from pilamim.evaluate.features import extract_features, make_loader
from pilamim.evaluate.knn import knn_metrics
from pilamim.evaluate.metrics import classification_metrics, topk_accuracy
from pilamim.evaluate.seeding import seeded
from pilamim.io import OutputBatch, atomic_write
from pilamim.loggers import Logger, MemoryLogger, NullLogger
from pilamim.schedules import cosine_with_warmup, set_lr

Batches = Callable[[int], Iterator[tuple[Tensor, Tensor]]]


def build_probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps=1e-6) then Linear; weights trunc-normal(0.01), bias 0.

    The parameter-free BatchNorm whitens features whose scale differs wildly between
    pretraining methods, so one lr suits them all (MAE's probe does the same).
    """
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def build_probe_optimizer(head: nn.Module, optimizer: str, lr: float,
                          weight_decay: float) -> torch.optim.Optimizer:
    """LARS adapts (and decays) only the weight matrix; the bias is plain momentum SGD.

    That is the MAE convention (trust ratio for ndim > 1 only). timm's ``Lars`` adapts only
    when a group has weight decay unless ``always_adapt`` is set, so the weight group sets it.
    """
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    if optimizer == "sgd":
        groups = [{"params": weights, "weight_decay": weight_decay},
                  {"params": others, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    groups = [{"params": weights, "weight_decay": weight_decay, "always_adapt": True},
              {"params": others, "weight_decay": 0.0, "always_adapt": False}]
    return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)


def _cached_batches(feats: Tensor, labels: Tensor, batch: int,
                    generator: torch.Generator) -> tuple[Batches, int]:
    """Shuffled full batches of cached features (the remainder is dropped, as MAE does)."""
    n = feats.shape[0]
    steps = n // batch

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(n, generator=generator).to(feats.device)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            yield feats[idx], labels[idx]

    return batches, steps


def _augmented_batches(encoder: nn.Module, dataset: Dataset, batch: int, params: ProbeParams,
                       device: torch.device, dtype: torch.dtype | None,
                       generator: torch.Generator) -> tuple[Batches, int]:
    """Augmented images through the frozen encoder (eval mode, no grad) on every step."""
    loader = make_loader(dataset, batch, device, params.num_workers, shuffle=True,
                         drop_last=True, generator=generator)
    encoder.to(device).eval()

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in loader:
            with torch.no_grad(), autocast(device, dtype):
                feats = encoder(images.to(device, non_blocking=True))
            yield feats.float(), torch.as_tensor(labels).long().to(device)

    return batches, len(loader)


@torch.no_grad()
def _predict(head: nn.Module, feats: Tensor, batch: int = 4096) -> Tensor:
    head.eval()
    return torch.cat([head(feats[i:i + batch]) for i in range(0, feats.shape[0], batch)])


def report_split(eval_sets: Mapping[str, Any]) -> str:
    """The split whose numbers are reported: 'test' (never used for selection) else the last."""
    if not eval_sets:
        raise ValueError("at least one evaluation split is needed")
    return "test" if "test" in eval_sets else list(eval_sets)[-1]


SELECTION_SPLIT = "val"


def candidates(params: ProbeParams) -> list[tuple[float, float]]:
    """Every (base_lr, weight_decay) pair of the probe's grid, in params order."""
    return [(lr, wd) for lr in _as_list(params.base_lr) for wd in _as_list(params.weight_decay)]


def _as_list(value: float | Sequence[float]) -> list[float]:
    return [float(v) for v in value] if isinstance(value, Sequence) else [float(value)]


def select_candidate(scores: Sequence[float]) -> int:
    """Index of the best selection-split top-1; the earliest (params order) wins a tie."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def train_probe_head(batches: Batches, steps_per_epoch: int, dim: int, num_classes: int,
                     params: ProbeParams, base_lr: float, weight_decay: float, batch: int,
                     monitor: Mapping[str, tuple[Tensor, Tensor]], device: torch.device,
                     logger: Logger) -> tuple[nn.Module, float, int]:
    """One head, ``params.epochs`` epochs of warm-up + cosine; returns (head, last epoch's
    train loss, steps). Logs per epoch the train loss, lr and top-1/5 on each ``monitor`` split."""
    head = build_probe_head(dim, num_classes).to(device)
    lr = base_lr * batch / 256
    optimizer = build_probe_optimizer(head, params.optimizer, lr, weight_decay)
    total, warmup = params.epochs * steps_per_epoch, params.warmup_epochs * steps_per_epoch
    step, train_loss = 0, float("nan")
    lines = EpochLines("linear probe", params.epochs, steps_per_epoch * batch)
    for epoch in tqdm(range(params.epochs), desc="linear probe", leave=False,
                      disable=not sys.stderr.isatty()):
        head.train()
        loss_sum, seen = torch.zeros((), device=device), 0
        for feats, labels in batches(epoch):
            set_lr(optimizer, cosine_with_warmup(step, total, warmup, lr))
            loss = F.cross_entropy(head(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * labels.shape[0]
            seen += labels.shape[0]
            step += 1
        train_loss = (loss_sum / max(1, seen)).item()
        logged = {"probe/train_loss": train_loss, "probe/lr": optimizer.param_groups[0]["lr"]}
        for name, (feats, labels) in monitor.items():
            logits = _predict(head, feats.to(device)).cpu()
            logged[f"probe/{name}_top1"] = topk_accuracy(logits, labels, 1)
            logged[f"probe/{name}_top5"] = topk_accuracy(logits, labels, 5)
        logger.log_metrics(logged, step=epoch + 1)
        lines.done(epoch, logged)
    return head, train_loss, step


def run_linear_probe(encoder: nn.Module, train_ds: Dataset, eval_sets: Mapping[str, Dataset],
                     classes: Sequence[str], params: ProbeParams, device: torch.device | str,
                     logger: Logger | None = None, *, knn_train_ds: Dataset | None = None,
                     head_path: str | Path | None = None,
                     outputs: OutputBatch | None = None) -> dict[str, Any]:
    """Train a linear probe on the frozen ``encoder``; return metrics per eval split.

    With several (base_lr, weight_decay) candidates (lists in ``params``) one head is trained
    per candidate and the one with the best top-1 on the 'val' split is kept, as the MAE, DINO
    and I-JEPA evaluations sweep their probes: the gate metric then means the same for every
    encoder, not whichever one a hand-set lr suits. 'test' is evaluated once, with the kept
    head only. Only the kept head's per-epoch curve reaches ``logger``; every candidate's val
    top-1 is in the result's ``candidates``.

    Result: ``{split: {top1, top5, per_class_accuracy, confusion_matrix, num_samples, loss,
    knn_top1, knn_top5}, ...}`` plus top-level ``top1``/``top5``/``knn_top1``/``knn_top5``
    from :func:`report_split`, the chosen ``base_lr``, ``weight_decay`` and ``lr``, and run
    facts (``report_split``, ``feature_dim``, ``batch_size``, ``steps``, ``train_loss``).

    kNN uses the training features as memory bank; with ``params.augment`` those are
    augmented, so pass ``knn_train_ds`` (same images, eval transform) to get kNN numbers
    (without it kNN is skipped in that mode). ``head_path`` saves the kept head (staged in
    ``outputs`` when given, to appear together with the stage's other outputs).
    """
    logger = NullLogger() if logger is None else logger
    device = torch.device(device)
    num_classes = len(classes)
    report = report_split(eval_sets)
    grid = candidates(params)
    if len(grid) > 1 and SELECTION_SPLIT not in eval_sets:
        raise ValueError(
            f"probe.base_lr/weight_decay list {len(grid)} candidates to choose from on the "
            f"'{SELECTION_SPLIT}' split, but there is none (splits: {sorted(eval_sets)}); set "
            "data.val_fraction > 0, or give probe.base_lr and probe.weight_decay one value each")
    dtype = autocast_dtype(device, params.precision)
    was_training = encoder.training

    def extract(ds: Dataset, desc: str) -> tuple[Tensor, Tensor]:
        return extract_features(encoder, ds, params.batch_size, device, params.num_workers,
                                dtype, desc)

    try:
        with seeded(params.seed, device):
            evals = {name: extract(ds, f"features {name}") for name, ds in eval_sets.items()}
            generator = torch.Generator().manual_seed(params.seed)
            n_train = len(train_ds)  # type: ignore[arg-type]
            if n_train < 2:
                raise ValueError(f"linear probe needs at least 2 training samples, got {n_train}")
            batch = min(params.batch_size, n_train)
            memory = None
            if params.augment:
                batches, steps_per_epoch = _augmented_batches(encoder, train_ds, batch, params,
                                                              device, dtype, generator)
                if knn_train_ds is not None:
                    memory = extract(knn_train_ds, "features knn memory")
            else:
                memory = extract(train_ds, "features train")
                cached = (memory[0].to(device), memory[1].to(device))
                batches, steps_per_epoch = _cached_batches(*cached, batch, generator)
            dim = next(iter(evals.values()))[0].shape[1]
            monitor = {name: fl for name, fl in evals.items() if name != "test"}
            trained, curves, scores = [], [], []
            for base_lr, weight_decay in grid:
                # Same init and batch order for every candidate: a grid entry trains exactly
                # the head a run with that single value would.
                torch.manual_seed(params.seed)
                generator.manual_seed(params.seed)
                curve = MemoryLogger()
                trained.append(train_probe_head(batches, steps_per_epoch, dim, num_classes,
                                                params, base_lr, weight_decay, batch, monitor,
                                                device, curve))
                curves.append(curve)
                last = curve.series(f"probe/{SELECTION_SPLIT}_top1")
                scores.append(last[-1] if last else 0.0)
            chosen = select_candidate(scores)
            head, train_loss, step = trained[chosen]
            for epoch, logged in curves[chosen].metrics:
                logger.log_metrics(logged, step=epoch)
    finally:
        encoder.train(was_training)  # the caller's module comes back as it was

    result: dict[str, Any] = {}
    for name, (feats, labels) in evals.items():
        logits = _predict(head, feats.to(device)).float().cpu()
        split = classification_metrics(logits, labels, classes)
        split["loss"] = F.cross_entropy(logits, labels).item()
        if memory is not None:
            split.update(knn_metrics(memory[0].to(device), memory[1], feats, labels,
                                     num_classes, params.knn_k, params.knn_temperature))
        result[name] = split
    final = {f"probe/{name}_{key}": result[name][key] for name in result
             for key in ("top1", "top5", "knn_top1", "knn_top5") if key in result[name]}
    base_lr, weight_decay = grid[chosen]
    final.update({"probe/base_lr": base_lr, "probe/weight_decay": weight_decay})
    logger.log_metrics(final, step=params.epochs)
    result.update({key: result[report][key] for key in ("top1", "top5", "knn_top1", "knn_top5")
                   if key in result[report]})
    result.update(report_split=report, feature_dim=dim, num_classes=num_classes,
                  train_samples=n_train, batch_size=batch, base_lr=base_lr,
                  weight_decay=weight_decay, lr=base_lr * batch / 256, steps=step,
                  train_loss=train_loss, epochs=params.epochs,
                  candidates=[{"base_lr": lr, "weight_decay": wd, f"{SELECTION_SPLIT}_top1": v}
                              for (lr, wd), v in zip(grid, scores, strict=True)])
    if head_path is not None:
        save_probe_head(head, classes, head_path, outputs)
    return result


def save_probe_head(head: nn.Module, classes: Sequence[str], path: str | Path,
                    batch: OutputBatch | None = None) -> Path:
    """``{"state_dict", "feature_dim", "classes"}`` written atomically with ``torch.save``
    (or staged in ``batch``)."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    saved = {"state_dict": state, "feature_dim": head[1].in_features, "classes": list(classes)}
    write = batch.write if batch is not None else atomic_write
    return write(path, lambda tmp: torch.save(saved, tmp))


def load_probe_head(path: str | Path) -> tuple[nn.Sequential, list[str]]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = build_probe_head(saved["feature_dim"], len(saved["classes"]))
    head.load_state_dict(saved["state_dict"])
    return head.eval(), list(saved["classes"])

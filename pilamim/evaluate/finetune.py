"""End-to-end fine-tuning, MAE protocol, assembled from timm parts.

Global average pooling + fc_norm head, AdamW (0.9, 0.999) with layer-wise lr decay, drop
path, Mixup/CutMix with label smoothing, RandAugment + random erasing, lr = base_lr x global
batch / 256 with per-iteration warm-up then cosine, bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pilamim.config import FinetuneParams
from pilamim.data.progress import EpochLines
from pilamim.data.shuffle_windows import WindowedShuffle
from pilamim.device import autocast, autocast_dtype
from pilamim.evaluate.features import make_loader
from pilamim.evaluate.linear_probe import report_split
from pilamim.evaluate.metrics import classification_metrics, topk_accuracy
from pilamim.evaluate.seeding import seeded
from pilamim.evaluate.timm_compat import safe_posterize
from pilamim.loggers import Logger, NullLogger
from pilamim.model.attention import use_cpu_autocast_attention
from pilamim.model.export import WEIGHTS, read_spec
from pilamim.recipes import resolve_crop_scale, uses_mae_regularisation
from pilamim.schedules import cosine_with_warmup, set_lr

# With global_pool="avg" timm moves the final norm after pooling (fc_norm): the exported
# ``norm.*`` has no place, ``fc_norm.*`` and the new ``head.*`` start fresh (as in MAE). With
# "token" the pretrained final norm stays and only the head is new.
_MAY_BE_MISSING = {"avg": ("head.", "fc_norm."), "token": ("head.",)}
_MAY_BE_UNEXPECTED = {"avg": ("norm.",), "token": ()}


class EncoderLoadError(ValueError):
    """The exported encoder does not fit the model its own encoder.json describes."""


class ToMode:
    """Convert a PIL image to 'L' (1 channel) or 'RGB' (3) so it matches ``mean``/``std``.

    timm's RandAugment fills rotated/sheared/translated borders with ``round(255 * mean)``
    as a tuple; PIL requires that fill to have one entry per image band, so an 'L' image with a
    3-entry mean fails ("color must be int or single-element tuple") and an RGB image with a
    1-entry mean is filled wrongly. Converting the image to the mode the statistics describe
    keeps both in step (1-channel images with a 1-entry mean work with every timm op).
    """

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"fine-tune transforms support 1 or 3 channels, got {channels}")
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def finetune_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                       params: FinetuneParams, train: bool) -> Callable[[Image.Image], Tensor]:
    """PIL image -> normalised tensor; training adds RRC and flip, plus RandAugment and random
    erasing under MAE regularisation (``params.regularisation``, :mod:`pilamim.recipes`).

    Evaluation resizes the shorter side to ``img_size / 0.875`` and centre-crops for images of
    64 px and more, and simply resizes small images (28 px) — the same rule as the data
    package's ``eval_transform``.
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std):
        raise ValueError(f"mean {mean} and std {std} must have the same length")
    if train:
        strong = uses_mae_regularisation(params.regularisation, params.epochs)
        with safe_posterize():  # timm binds its ops here; see timm_compat
            tf = create_transform(img_size, is_training=True,
                                  scale=resolve_crop_scale(params.crop_scale, img_size),
                                  auto_augment=params.randaugment if strong else None,
                                  color_jitter=None, re_prob=params.reprob if strong else 0.0,
                                  re_mode="pixel", re_count=1, interpolation="bicubic",
                                  mean=mean, std=std)
    else:
        tf = create_transform(img_size, is_training=False, interpolation="bicubic",
                              crop_pct=0.875 if img_size >= 64 else 1.0, mean=mean, std=std)
    tf.transforms.insert(0, ToMode(len(mean)))
    return tf


def build_finetune_model(encoder_dir: str | Path, num_classes: int, drop_path: float = 0.0,
                         global_pool: str = "avg") -> nn.Module:
    """The exported encoder with a Linear head on pooled features.

    ``avg`` is MAE's fine-tune head (mean of patch tokens, new fc_norm); ``token`` keeps the
    [CLS] token and final norm PiLaMIM pretrained, which at small budgets starts from what
    the linear probe sees instead of from a fresh norm (docs/METHOD.md, "Recipes"). Only
    head (and for ``avg`` fc_norm) keys may be missing and only ``norm.*`` unexpected;
    anything else means the weights and encoder.json disagree, and is an error.
    """
    spec = read_spec(encoder_dir)
    kwargs = {**spec["kwargs"], "num_classes": num_classes, "global_pool": global_pool,
              "drop_path_rate": drop_path}
    model = timm.create_model(spec["model_name"], pretrained=False, **kwargs)
    state = load_file(str(Path(encoder_dir) / WEIGHTS))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise EncoderLoadError(
            f"encoder weights in {encoder_dir} do not fit {spec['model_name']} with the kwargs "
            f"in its encoder.json ({err}); re-export it with `pilamim pretrain`"
        ) from None
    may_miss, may_surprise = _MAY_BE_MISSING[global_pool], _MAY_BE_UNEXPECTED[global_pool]
    bad_missing = sorted(k for k in missing if not k.startswith(may_miss))
    bad_unexpected = sorted(k for k in unexpected if not k.startswith(may_surprise))
    if bad_missing or bad_unexpected:
        raise EncoderLoadError(
            f"encoder weights in {encoder_dir} do not match {spec['model_name']}: "
            f"missing {bad_missing}, unexpected {bad_unexpected} (only head.*/fc_norm.* may be "
            "missing and norm.* unexpected); re-export it with `pilamim pretrain`"
        )
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return use_cpu_autocast_attention(model)


def build_finetune_optimizer(model: nn.Module, params: FinetuneParams,
                             lr: float) -> torch.optim.Optimizer:
    """AdamW with timm's layer-wise lr decay groups (each carries ``lr_scale``); no decay on
    biases, norms, tokens and position embeddings."""
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=params.weight_decay,
                               layer_decay=params.layer_decay, betas=(0.9, 0.999))


def build_mixup(params: FinetuneParams, num_classes: int) -> Mixup | None:
    """Mixup/CutMix under MAE regularisation (see :mod:`pilamim.recipes`), else None."""
    strong = uses_mae_regularisation(params.regularisation, params.epochs)
    if not strong or (params.mixup <= 0 and params.cutmix <= 0):
        return None
    return Mixup(mixup_alpha=params.mixup, cutmix_alpha=params.cutmix, prob=1.0,
                 switch_prob=0.5, mode="batch", label_smoothing=params.label_smoothing,
                 num_classes=num_classes)


def build_criterion(params: FinetuneParams, mixup: Mixup | None) -> nn.Module:
    """Soft-target CE when Mixup makes the targets (it applies the smoothing itself)."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)


@torch.inference_mode()
def predict(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
            dtype: torch.dtype | None, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Logits (fp32, CPU) and labels for a whole dataset, model in eval mode."""
    model.eval()
    logits, labels = [], []
    for images, targets in make_loader(dataset, batch_size, device, num_workers):
        with autocast(device, dtype):
            out = model(images.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(targets).long())
    return torch.cat(logits).clone(), torch.cat(labels).clone()


@dataclass
class FinetuneRun:
    """What :func:`build_run` builds and the epochs share: model, data, optimizer and schedule,
    and the optimizer steps taken so far (``step``, which drives the lr schedule)."""

    model: nn.Module
    loader: DataLoader
    mixup: Mixup | None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    micro: int  # micro-batch size
    accum: int  # micro-batches per optimizer step
    used: int  # micro-batches per epoch that make whole optimizer steps
    lr: float  # peak lr
    total: int  # optimizer steps in the run
    warmup: int
    step: int = 0


def run_finetune(encoder_dir: str | Path, train_ds: Dataset, eval_sets: Mapping[str, Dataset],
                 classes: Sequence[str], params: FinetuneParams, device: torch.device | str,
                 logger: Logger | None = None) -> tuple[dict[str, Any], nn.Module]:
    """Fine-tune the exported encoder; return (metrics per eval split, trained model).

    ``train_ds`` should carry :func:`finetune_transform` (train=True), the eval sets the eval
    transform. Metrics have the probe's shape: ``{split: {top1, top5, per_class_accuracy,
    confusion_matrix, num_samples, loss}}`` plus top-level ``top1``/``top5`` of the report
    split ('test' if given, else the last). Per epoch it logs ``finetune/train_loss``,
    ``finetune/lr`` and ``finetune/<split>_top1|top5`` for every split except 'test'
    (step = epochs completed). Single process; the global batch is batch_size x accum_steps.
    """
    logger = NullLogger() if logger is None else logger
    device = torch.device(device)
    report = report_split(eval_sets)
    dtype = autocast_dtype(device, params.precision)

    with seeded(params.seed, device):
        run = build_run(encoder_dir, train_ds, len(classes), params, device)
        train_loss = float("nan")
        lines = EpochLines("fine-tune", params.epochs, len(train_ds))  # type: ignore[arg-type]
        for epoch in tqdm(range(params.epochs), desc="fine-tune", leave=False,
                          disable=not sys.stderr.isatty()):
            train_loss = train_one_epoch(run, epoch, params, device, dtype)
            metrics = epoch_metrics(run, train_loss, eval_sets, params, device, dtype)
            logger.log_metrics(metrics, step=epoch + 1)
            lines.done(epoch, metrics)

    result: dict[str, Any] = evaluate_splits(run.model, eval_sets, classes, params, device,
                                             dtype)
    logger.log_metrics({f"finetune/{name}_{key}": result[name][key] for name in result
                        for key in ("top1", "top5")}, step=params.epochs)
    result.update(top1=result[report]["top1"], top5=result[report]["top5"],
                  report_split=report, num_classes=len(classes),
                  train_samples=len(train_ds),  # type: ignore[arg-type]
                  batch_size=run.micro * run.accum, lr=run.lr, steps=run.step,
                  train_loss=train_loss, epochs=params.epochs)
    return result, run.model


def build_run(encoder_dir: str | Path, train_ds: Dataset, num_classes: int,
              params: FinetuneParams, device: torch.device) -> FinetuneRun:
    """Model, Mixup, loss, loader, optimizer and lr schedule, in this order (it fixes what each
    draws from the seeded RNGs). Mixup pairs samples, so its micro-batch is even."""
    model = build_finetune_model(encoder_dir, num_classes, params.drop_path,
                                 params.global_pool).to(device)
    mixup = build_mixup(params, num_classes)
    criterion = build_criterion(params, mixup)
    n_train = len(train_ds)  # type: ignore[arg-type]
    micro = min(params.batch_size, n_train)
    if mixup is not None:
        micro -= micro % 2  # Mixup/CutMix pair samples within a batch
    if micro < (2 if mixup is not None else 1):
        raise ValueError(f"fine-tuning needs at least 2 training samples, got {n_train}")
    generator = torch.Generator().manual_seed(params.seed)
    if params.shuffle_window_chunks is None:
        loader = make_loader(train_ds, micro, device, params.num_workers, shuffle=True,
                             drop_last=True, generator=generator)
    else:
        loader = _windowed_loader(train_ds, micro, device, params, generator)
    accum = min(params.accum_steps, len(loader))
    updates_per_epoch = len(loader) // accum
    lr = params.base_lr * micro * accum / 256
    optimizer = build_finetune_optimizer(model, params, lr)
    return FinetuneRun(model, loader, mixup, criterion, optimizer, micro, accum,
                       used=updates_per_epoch * accum, lr=lr,
                       total=params.epochs * updates_per_epoch,
                       warmup=params.warmup_epochs * updates_per_epoch)


def _windowed_loader(train_ds: Dataset, micro: int, device: torch.device,
                     params: FinetuneParams, generator: torch.Generator) -> DataLoader:
    """The training loader when ``finetune.shuffle_window_chunks`` is set: a shuffle that reads
    that many shards at a time (:func:`pilamim.data.shuffle_windows.windowed_order`), for a split
    larger than the node's shard cache; ``generator`` draws each epoch's order and the worker
    seeds, as it does for the whole-split shuffle."""
    chunks = getattr(getattr(train_ds, "shards", None), "chunk_items", None)
    if chunks is None:
        raise ValueError("finetune.shuffle_window_chunks needs a training set read from shards "
                         "(a ManifestDataset); set it to null for this one")
    sampler = WindowedShuffle(chunks, params.shuffle_window_chunks or 1, generator)
    return make_loader(train_ds, micro, device, params.num_workers, drop_last=True,
                       generator=generator, sampler=sampler)


def train_one_epoch(run: FinetuneRun, epoch: int, params: FinetuneParams, device: torch.device,
                    dtype: torch.dtype | None) -> float:
    """One pass over the loader's whole optimizer steps (a trailing partial accumulation is
    left out); returns the mean training loss, and refuses a non-finite one."""
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, seen = torch.zeros((), device=device), 0
    for i, (images, labels) in enumerate(run.loader):
        if i >= run.used:
            break
        if i % run.accum == 0:
            set_lr(run.optimizer,
                   cosine_with_warmup(run.step, run.total, run.warmup, run.lr, params.min_lr))
        loss_sum += train_micro_batch(run, images, labels, device, dtype)
        seen += images.shape[0]
        if (i + 1) % run.accum == 0:
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
    train_loss = (loss_sum / max(1, seen)).item()
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"fine-tune loss is {train_loss} in epoch {epoch + 1}; lower "
            "finetune.base_lr or set finetune.precision: fp32"
        )
    return train_loss


def train_micro_batch(run: FinetuneRun, images: Tensor, labels: Any, device: torch.device,
                      dtype: torch.dtype | None) -> Tensor:
    """Forward and backward of one micro-batch (Mixup applied, the loss scaled for gradient
    accumulation); returns its loss summed over the images, on the device. The optimizer step
    is the caller's, so ``benchmarks.cpu_step`` times exactly what an epoch runs."""
    images = images.to(device, non_blocking=True)
    targets = torch.as_tensor(labels).long().to(device, non_blocking=True)
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    with autocast(device, dtype):
        logits = run.model(images)
    loss = run.criterion(logits.float(), targets)
    (loss / run.accum).backward()
    return loss.detach() * images.shape[0]


def epoch_metrics(run: FinetuneRun, train_loss: float, eval_sets: Mapping[str, Dataset],
                  params: FinetuneParams, device: torch.device,
                  dtype: torch.dtype | None) -> dict[str, float]:
    """The per-epoch curve: train loss, peak lr of the groups, and top-1/5 of every split but
    'test' (the test split is looked at once, at the end)."""
    logged = {"finetune/train_loss": train_loss,
              "finetune/lr": max(g["lr"] for g in run.optimizer.param_groups)}
    for name, ds in eval_sets.items():
        if name == "test":
            continue
        logits, labels = predict(run.model, ds, params.batch_size, device, dtype,
                                 params.num_workers)
        logged[f"finetune/{name}_top1"] = topk_accuracy(logits, labels, 1)
        logged[f"finetune/{name}_top5"] = topk_accuracy(logits, labels, 5)
    return logged


def evaluate_splits(model: nn.Module, eval_sets: Mapping[str, Dataset], classes: Sequence[str],
                    params: FinetuneParams, device: torch.device,
                    dtype: torch.dtype | None) -> dict[str, Any]:
    """Final metrics per split (the probe's shape) plus the unsmoothed cross-entropy loss."""
    result: dict[str, Any] = {}
    for name, ds in eval_sets.items():
        logits, labels = predict(model, ds, params.batch_size, device, dtype, params.num_workers)
        split = classification_metrics(logits, labels, classes)
        split["loss"] = nn.functional.cross_entropy(logits, labels).item()
        result[name] = split
    return result

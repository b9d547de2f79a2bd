"""Watching a pretraining run learn: loss meters, the kNN monitor, reconstruction figures and the
final val losses.

Kept apart from :mod:`pilamim.train.loop` so the loop reads as the loop. Nothing here trains,
but the kNN monitor's loaders draw from the global torch RNG (each DataLoader iterator does),
whose state the checkpoint saves: the loop calls the monitors at the same points of every run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pilamim.config import Params
from pilamim.data.memory_split import eval_dataset
from pilamim.data.prepared import PreparedDataset
from pilamim.device import autocast_dtype
from pilamim.evaluate.features import extract_features
from pilamim.evaluate.knn import knn_metrics
from pilamim.loggers import Logger
from pilamim.model import PiLaMIM
from pilamim.train.figures import reconstruction_figure
from pilamim.train.step import LOSS_TERMS

# The reconstruction figure shows one image per class, up to this many classes.
FIGURE_MAX_IMAGES = 10


@dataclasses.dataclass
class LossMeter:
    """Loss sums since the last log line and since the epoch began, kept on the device: adding
    never syncs with the host; only reading them for a log line does."""

    sums: dict[str, torch.Tensor]
    epoch_sums: dict[str, torch.Tensor]
    counted: int = 0  # micro-batches in ``sums``
    epoch_counted: int = 0
    images_since: int = 0  # images since the last log line, for images/s
    t_log: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, device: torch.device) -> LossMeter:
        return cls({k: torch.zeros((), device=device) for k in LOSS_TERMS},
                   {k: torch.zeros((), device=device) for k in LOSS_TERMS})

    def add(self, losses: dict[str, torch.Tensor], micro_batches: int, images: int) -> None:
        for k, v in losses.items():
            self.sums[k] += v
            self.epoch_sums[k] += v
        self.counted += micro_batches
        self.epoch_counted += micro_batches
        self.images_since += images

    def restart_log(self) -> None:
        for v in self.sums.values():
            v.zero_()
        self.counted, self.images_since, self.t_log = 0, 0, time.perf_counter()

    def take_epoch_means(self) -> dict[str, float]:
        """Mean of each loss term over the epoch (one host sync per term), then start over."""
        means = {k: (self.epoch_sums[k] / max(self.epoch_counted, 1)).item() for k in LOSS_TERMS}
        for v in self.epoch_sums.values():
            v.zero_()
        self.epoch_counted = 0
        return means


@dataclasses.dataclass(frozen=True)
class Monitors:
    """What the per-epoch monitors need, built once by :func:`build_monitors`.

    ``figure_images`` and ``knn_sets`` are None where that monitor is off, as both are on every
    rank but 0 (``is_main`` False), which only takes its epoch mean losses.
    """

    params: Params
    prepared: PreparedDataset
    device: torch.device
    is_main: bool
    figure_images: torch.Tensor | None  # one val image per class for the reconstruction figure
    knn_sets: tuple[Subset, Dataset] | None  # (memory bank, queries)


def build_monitors(model: PiLaMIM, prepared: PreparedDataset, params: Params,
                   device: torch.device, is_main: bool) -> Monitors:
    """The figure batch and kNN sets, decoded once, on rank 0 and only when they are wanted."""
    p = params.pretrain
    figure_images = (figure_batch(prepared, params, device)
                     if is_main and model.pixel_decoder is not None
                     and p.figure_every_epochs else None)
    knn_sets = knn_monitor_sets(prepared, params) if is_main and p.knn_every_epochs else None
    return Monitors(params, prepared, device, is_main, figure_images, knn_sets)


def run_monitors(monitors: Monitors, model: PiLaMIM, epoch: int, step: int, meter: LossMeter,
                 logger: Logger) -> None:
    """End of an epoch: the epoch's mean losses, plus on rank 0 the kNN monitor and the
    reconstruction figure at their cadences. Keep the order: the kNN loaders draw from the
    global torch RNG (each DataLoader iterator does), whose state the checkpoint saves."""
    p = monitors.params.pretrain
    epoch_metrics = {f"pretrain/epoch_{k}": v for k, v in meter.take_epoch_means().items()}
    if not monitors.is_main:
        return
    if p.knn_every_epochs and (epoch + 1) % p.knn_every_epochs == 0:
        epoch_metrics.update(knn_monitor(model, *monitors.knn_sets,
                                         monitors.prepared.num_classes, monitors.device,
                                         autocast_dtype(monitors.device, p.precision)))
    logger.log_metrics(epoch_metrics, step)
    if monitors.figure_images is not None and (epoch + 1) % p.figure_every_epochs == 0:
        logger.log_artifact(save_figure(model, monitors.figure_images, monitors.params,
                                        monitors.prepared, epoch, Path(p.out_dir)))


def one_per_class(labels: list[int], limit: int = FIGURE_MAX_IMAGES) -> list[int]:
    """Index of the first image of each class, in class order, for at most ``limit`` classes:
    a figure of the first few images of a sorted split would show a single class."""
    first: dict[int, int] = {}
    for index, label in enumerate(labels):
        first.setdefault(label, index)
    return [first[label] for label in sorted(first)][:limit]


def figure_batch(prepared: PreparedDataset, params: Params,
                 device: torch.device) -> torch.Tensor:
    """One val image per class (train if there is no val split), as the model sees them."""
    split = "val" if prepared.split("val") else "train"
    ds = eval_dataset(prepared, split, params.model.img_size)
    return torch.stack([ds[i][0] for i in one_per_class(ds.labels)]).to(device)


def save_figure(model: PiLaMIM, images: torch.Tensor, params: Params, prepared: PreparedDataset,
                epoch: int, out_dir: Path) -> Path:
    """The epoch's reconstruction figure under ``out_dir/figures``, with a fixed mask (the same
    seeded noise every epoch, so figures compare); the model's train/eval mode is kept."""
    g = torch.Generator(device=images.device).manual_seed(params.pretrain.seed)
    noise = torch.rand(images.shape[0], model.num_patches, generator=g, device=images.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(images, noise)
    model.train(was_training)
    return reconstruction_figure(
        images, out.pred_pixels, out.mask, params.model.patch_size, prepared.mean, prepared.std,
        out_dir / "figures" / f"recon_epoch{epoch:03d}.png", title=f"epoch {epoch}",
        norm_pix=params.model.norm_pix_loss)


def knn_monitor_sets(prepared: PreparedDataset, params: Params,
                     max_bank: int = 3000) -> tuple[Subset, Dataset]:
    """(memory bank, queries) for the kNN monitor, built once so each image is decoded once:
    at most ``max_bank`` training images, every n-th one (the manifest is in class order, so
    the first ``max_bank`` would leave classes out), and the val split (else test)."""
    train = eval_dataset(prepared, "train", params.model.img_size)
    bank = Subset(train, range(0, len(train), max(1, -(-len(train) // max_bank))))
    return bank, eval_dataset(prepared, "val" if prepared.split("val") else "test",
                              params.model.img_size)


def knn_monitor(model: PiLaMIM, bank: Subset, query: Dataset, num_classes: int,
                device: torch.device, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Cheap representation check while training: cosine kNN (k=20, T=0.07) of ``query`` on
    ``bank``, at the training's precision. Pixel-only models score low here early on; a
    monitor, never a gate (docs/METHOD.md)."""
    feats, labels = extract_features(model.encoder, bank, 256, device, dtype=dtype)
    qfeats, qlabels = extract_features(model.encoder, query, 256, device, dtype=dtype)
    result = knn_metrics(feats, labels, qfeats, qlabels, num_classes)
    return {f"pretrain/{k}": v for k, v in result.items()}


@torch.no_grad()
def final_losses(model: PiLaMIM, prepared: PreparedDataset, params: Params,
                 device: torch.device, max_images: int = 512) -> dict[str, float]:
    """Losses on the val split without augmentation, a fixed mask: comparable across runs."""
    split = "val" if prepared.split("val") else "train"
    ds = eval_dataset(prepared, split, params.model.img_size)
    loader = DataLoader(range(min(len(ds), max_images)), batch_size=128)
    g = torch.Generator(device=device).manual_seed(params.pretrain.seed)
    totals: dict[str, float] = {}
    n = 0
    model.eval()
    for idx in loader:
        images = torch.stack([ds[int(i)][0] for i in idx]).to(device)
        out = model(images, torch.rand(len(idx), model.num_patches, generator=g, device=device))
        for k in LOSS_TERMS:
            v = getattr(out, k)
            if v is not None:
                totals[f"val_{k}"] = totals.get(f"val_{k}", 0.0) + float(v) * len(idx)
        n += len(idx)
    return {k: v / n for k, v in totals.items()}

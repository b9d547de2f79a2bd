"""The pretraining loop: resumable, DDP-aware, no host sync per step on the GPU.

Reports through a :class:`pilamim.callbacks.Logger`; writes the checkpoint, the exported encoder,
reconstruction figures and ``metrics/pretrain.json``. Its output folders are checked writable
before anything else (a read-only ``metrics/`` is not found after the training), and the end
of a run (checkpoint promotion, encoder, metrics JSON last) is one :class:`OutputBatch`: all
of it appears, or none. Which checkpoint a run resumes: :mod:`pilamim.train.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pilamim.callbacks import Logger, NullLogger
from pilamim.config import Params
from pilamim.data.dataset import ManifestDataset
from pilamim.data.prepared import PreparedDataset, load_prepared
from pilamim.data.pretrain_input import PretrainInput, pretrain_input
from pilamim.data.transforms import eval_transform
from pilamim.device import resolve_device
from pilamim.evaluate.features import extract_features
from pilamim.evaluate.knn import knn_metrics
from pilamim.io import OutputBatch, ensure_writable
from pilamim.model import PiLaMIM
from pilamim.model.export import export_encoder
from pilamim.recipes import resolve_crop_scale
from pilamim.train.checkpoint import (
    CHECKPOINT,
    Resume,
    find_resume,
    prune_recipe_checkpoints,
    save_checkpoint,
    stage_promotion,
)
from pilamim.train.distributed import DistInfo, barrier, init_distributed, shutdown
from pilamim.train.figures import reconstruction_figure
from pilamim.train.flops import peak_flops, step_flops_per_image
from pilamim.train.sampler import EpochSampler
from pilamim.train.step import LOSS_TERMS, Plan, StepResult, TrainStep, build_training


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left as it was."""


# Pretrain params that do not change what the checkpoint's state means (precision, compile and
# input_pipeline change rounding or resampling, not the recipe: a run may resume across them).
_BOOKKEEPING = {"epochs", "data_dir", "out_dir", "metrics_path", "plots_path", "knn_plots_path",
                "device",
                "checkpoint_every_steps", "log_every_steps", "figure_every_epochs",
                "knn_every_epochs", "num_workers", "compile", "precision", "input_pipeline"}


def _meta(params: Params, in_chans: int, global_batch: int, digest: str) -> dict[str, Any]:
    recipe = {k: v for k, v in params.pretrain.model_dump(mode="json").items()
              if k not in _BOOKKEEPING}
    return {"model": params.model.model_dump(mode="json"), "in_chans": in_chans,
            "global_batch": global_batch, "dataset_digest": digest, "recipe": recipe}


def resume_step(params: Params) -> int:
    """The step ``pretrain(params)`` will continue from (0: it starts over), read without
    building the model, so the stage can trim its loss-curve CSV to match before it trains.

    Asks the same question as the loop (:func:`find_resume`): ``checkpoint.pt`` may belong to
    another recipe, and then this recipe's own kept checkpoint (or none) decides. An unreadable
    checkpoint is the same :class:`CheckpointError` the loop would raise, naming the file.
    """
    p = params.pretrain
    prepared = load_prepared(p.data_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    meta = _meta(params, prepared.channels, p.batch_size * p.accum_steps * world,
                 prepared.digest)
    return find_resume(p.out_dir, meta, "cpu", mmap=True).step


# The reconstruction figure shows one image per class, up to this many classes.
FIGURE_MAX_IMAGES = 10


def one_per_class(labels: list[int], limit: int = FIGURE_MAX_IMAGES) -> list[int]:
    """Index of the first image of each class, in class order, for at most ``limit`` classes:
    a figure of the first few images of a sorted split would show a single class."""
    first: dict[int, int] = {}
    for index, label in enumerate(labels):
        first.setdefault(label, index)
    return [first[label] for label in sorted(first)][:limit]


def figure_batch(prepared, params: Params, device: torch.device) -> torch.Tensor:
    split = "val" if prepared.split("val") else "train"
    ds = ManifestDataset(prepared, split, eval_transform(params.model.img_size, prepared.mean,
                                                         prepared.std))
    return torch.stack([ds[i][0] for i in one_per_class(ds.labels)]).to(device)


def _save_figure(model: PiLaMIM, images: torch.Tensor, params: Params, prepared, epoch: int,
                 out_dir: Path) -> Path:
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


def pretrain(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    """Pretrain (or resume) per ``params``; returns the summary also written to metrics JSON."""
    logger = logger or NullLogger()
    p = params.pretrain
    info = init_distributed(p.device)
    try:
        return _pretrain(params, logger, info)
    finally:
        shutdown(info)


@dataclasses.dataclass
class Run:
    """What one pretraining run is built from, and where it stands (``step``, ``last_saved``).

    Plain state passed to the step functions below, so that :func:`_pretrain` reads as the
    loop it is and each function names only the step it does.
    """

    params: Params
    info: DistInfo
    device: torch.device
    prepared: PreparedDataset
    crop_scale: tuple[float, float]
    train_input: PretrainInput
    model: PiLaMIM
    optimizer: torch.optim.Optimizer
    plan: Plan
    mask_gen: torch.Generator
    meta: dict[str, Any]
    resume: Resume  # its ``path`` is the checkpoint this run writes
    step: int = 0
    last_saved: int = 0
    # Model FLOPs per image of one step, and one device's peak FLOP/s (None: unknown, no MFU):
    # fixed by the shapes and the device, so worked out once (pilamim.train.flops).
    flops_per_image: float = 0.0
    peak_flops: float | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.params.pretrain.out_dir)

    @property
    def train_set(self) -> Dataset:
        return self.train_input.dataset


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
    """Inputs of the per-epoch monitors, built once on rank 0 (None: that monitor is off)."""

    figure_images: torch.Tensor | None  # one val image per class for the reconstruction figure
    knn_sets: tuple[Subset, ManifestDataset] | None  # (memory bank, queries)


def _pretrain(params: Params, logger: Logger, info: DistInfo) -> dict[str, Any]:
    """The whole run at a glance; each step is its own function below, in the order the run
    takes them (which is also the order it draws from the RNGs: keep it)."""
    run = setup_run(params, info)
    resume_run(run)
    train_step = TrainStep(run.model, run.optimizer, run.plan, run.mask_gen, info, run.device)
    sampler = EpochSampler(len(run.train_set), info.world, info.rank, params.pretrain.seed)
    monitors = build_monitors(run)
    meter = LossMeter.zeros(run.device)
    t_start = time.perf_counter()
    progress = _progress_bar(run)
    try:  # a failed step (non-finite loss, interrupt) must not leave the bar open
        for epoch in range(run.step // run.plan.steps_per_epoch, params.pretrain.epochs):
            train_one_epoch(run, train_step, sampler, epoch, meter, logger, progress)
            run_monitors(run, monitors, epoch, meter, logger)
    finally:
        progress.close()
    if run.step != run.last_saved:
        checkpoint(run)
    barrier(info)
    return export_outputs(run, wall_time_s=time.perf_counter() - t_start)


def setup_run(params: Params, info: DistInfo) -> Run:
    """Data, model, optimizer and the checkpoint this run continues (its state not yet applied:
    :func:`resume_run` does that once every rank has read it)."""
    p = params.pretrain
    if info.is_main:  # before any work: a read-only output folder is no reason to train
        ensure_writable([p.out_dir, Path(p.metrics_path).parent])
    device = resolve_device(p.device, info.local_rank)
    prepared = load_prepared(p.data_dir)
    # Decoded-image cache only in-process: workers would each hold (and drop) their own copy.
    crop_scale = resolve_crop_scale(p.crop_scale, params.model.img_size)
    train_input = pretrain_input(prepared, "train", params.model.img_size, crop_scale,
                                 p.hflip, p.input_pipeline, device,
                                 cache=None if p.num_workers == 0 else False)
    model, optimizer, plan, mask_gen = build_training(
        params, prepared.channels, len(train_input.dataset), info, device)
    meta = _meta(params, prepared.channels, plan.global_batch, prepared.digest)
    return Run(params, info, device, prepared, crop_scale, train_input, model, optimizer, plan,
               mask_gen, meta, find_resume(Path(p.out_dir), meta, device),
               flops_per_image=step_flops_per_image(params.model, prepared.channels,
                                                    model.patch_matmul),
               peak_flops=peak_flops(device))


def resume_run(run: Run) -> None:
    """Apply the found checkpoint (model, optimizer, mask and CPU RNG state) and drop it from
    memory; rank 0 says what it continues and prunes other recipes' checkpoints."""
    barrier(run.info)  # every rank has read its state before rank 0 deletes anything
    if run.info.is_main:
        _announce(run.resume, run.out_dir, run.plan.total_steps)
        if run.resume.path.name != CHECKPOINT:
            prune_recipe_checkpoints(run.out_dir, protect=run.resume.path)
    run.step = run.last_saved = run.resume.step
    if run.resume.state is not None:
        _restore(run.resume.state, run.model, run.optimizer, run.mask_gen)
    run.resume = dataclasses.replace(run.resume, state=None)  # the state is not needed any more


def build_monitors(run: Run) -> Monitors:
    """The figure batch and kNN sets, decoded once, on rank 0 and only when they are wanted."""
    p = run.params.pretrain
    figure_images = (figure_batch(run.prepared, run.params, run.device)
                     if run.info.is_main and run.model.pixel_decoder is not None
                     and p.figure_every_epochs else None)
    knn_sets = (knn_monitor_sets(run.prepared, run.params)
                if run.info.is_main and p.knn_every_epochs else None)
    return Monitors(figure_images, knn_sets)


def _progress_bar(run: Run) -> tqdm:
    return tqdm(total=run.plan.total_steps, initial=run.step, disable=not run.info.is_main,
                desc="pretrain", unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs stay readable


def train_one_epoch(run: Run, train_step: TrainStep, sampler: EpochSampler, epoch: int,
                    meter: LossMeter, logger: Logger, progress: tqdm) -> None:
    """The epoch's remaining steps (all of them unless the run resumed inside this epoch); the
    sampler skips the images the checkpoint already trained on."""
    p = run.params.pretrain
    done_in_epoch = run.step - epoch * run.plan.steps_per_epoch
    sampler.set_epoch(epoch, start=done_in_epoch * p.accum_steps * p.batch_size)
    loader = DataLoader(run.train_set, batch_size=p.batch_size, sampler=sampler, drop_last=True,
                        num_workers=p.num_workers, pin_memory=run.device.type == "cuda",
                        persistent_workers=False, collate_fn=run.train_input.collate_fn)
    batches = iter(loader)
    run.model.train()
    for _ in range(done_in_epoch, run.plan.steps_per_epoch):
        micro = (run.train_input.to_device(batch)
                 for batch in itertools.islice(batches, p.accum_steps))
        result = train_step(micro, run.step,
                            want_grad_norm=(run.step + 1) % p.log_every_steps == 0)
        meter.add(result.losses, p.accum_steps, run.plan.global_batch)
        run.step += 1
        progress.update(1)
        after_step(run, result, epoch, meter, logger, progress)


def after_step(run: Run, result: StepResult, epoch: int, meter: LossMeter, logger: Logger,
               progress: tqdm) -> None:
    """Check the loss, log and checkpoint, each at its cadence (the last step does all)."""
    p = run.params.pretrain
    last = run.step == run.plan.total_steps
    at_log = run.step % p.log_every_steps == 0 or last
    at_ckpt = run.step % p.checkpoint_every_steps == 0 or last
    # On CPU a sync is free, so check every step; on GPU only when we read values.
    if at_log or at_ckpt or run.device.type == "cpu":
        _check_finite(meter.sums["loss"], run.step, run.resume.path, run.last_saved)
    if at_log:
        log_step(run, result, epoch, meter, logger, progress)
    if at_ckpt:
        checkpoint(run)


def log_step(run: Run, result: StepResult, epoch: int, meter: LossMeter, logger: Logger,
             progress: tqdm) -> None:
    """Mean losses since the last log line, lr, EMA momentum and throughput, as ``pretrain/*``
    at the current step; loss terms the preset does not use (all zero) are left out.

    Throughput is of the whole run, all processes together: ``images_per_s`` counts the global
    batch of every step, ``tflops_per_s`` is the model FLOP/s that makes (TFLOP/s, from
    :func:`pilamim.train.flops.step_flops_per_image`), and ``mfu`` (a fraction, only where the
    device's peak is known) divides it by the peak of all ``world`` devices.
    """
    elapsed = time.perf_counter() - meter.t_log
    sums = meter.sums
    metrics = {k: (sums[k] / meter.counted).item() for k in LOSS_TERMS
               if k == "loss" or sums[k].item() != 0.0}
    images_per_s = meter.images_since / max(elapsed, 1e-9)
    achieved = run.flops_per_image * images_per_s  # FLOP/s
    metrics.update(lr=result.lr, ema_momentum=result.momentum, epoch=epoch,
                   images_per_s=images_per_s, tflops_per_s=achieved / 1e12)
    if run.peak_flops is not None:
        metrics["mfu"] = achieved / (run.peak_flops * run.info.world)
    if result.grad_norm is not None:
        metrics["grad_norm"] = float(result.grad_norm)
    if run.info.is_main:
        logger.log_metrics({f"pretrain/{k}": v for k, v in metrics.items()}, run.step)
        shown = {"loss": f"{metrics['loss']:.4f}", "img_s": f"{images_per_s:.0f}"}
        if "mfu" in metrics:
            shown["mfu"] = f"{metrics['mfu']:.1%}"
        progress.set_postfix(shown)
    meter.restart_log()


def checkpoint(run: Run) -> None:
    """Rank 0 saves the run at its current step; every rank notes that step as saved."""
    if run.info.is_main:
        save_checkpoint(run.resume.path, model=run.model, optimizer=run.optimizer, step=run.step,
                        mask_generator=run.mask_gen, meta=run.meta)
    run.last_saved = run.step


def run_monitors(run: Run, monitors: Monitors, epoch: int, meter: LossMeter,
                 logger: Logger) -> None:
    """End of an epoch: the epoch's mean losses, plus on rank 0 the kNN monitor and the
    reconstruction figure at their cadences. Keep the order: the kNN loaders draw from the
    global torch RNG (each DataLoader iterator does), whose state the checkpoint saves."""
    p = run.params.pretrain
    epoch_metrics = {f"pretrain/epoch_{k}": v for k, v in meter.take_epoch_means().items()}
    if not run.info.is_main:
        return
    if p.knn_every_epochs and (epoch + 1) % p.knn_every_epochs == 0:
        epoch_metrics.update(_knn_monitor(run.model, *monitors.knn_sets,
                                          run.prepared.num_classes, run.device))
    logger.log_metrics(epoch_metrics, run.step)
    if monitors.figure_images is not None and (epoch + 1) % p.figure_every_epochs == 0:
        logger.log_artifact(_save_figure(run.model, monitors.figure_images, run.params,
                                         run.prepared, epoch, run.out_dir))


def export_outputs(run: Run, wall_time_s: float) -> dict[str, Any]:
    """The run's summary; rank 0 adds the val losses and commits checkpoint, encoder and
    metrics JSON together (:func:`_commit_outputs`)."""
    p, plan = run.params.pretrain, run.plan
    summary = {"steps": run.step, "epochs": p.epochs, "global_batch": plan.global_batch,
               "base_lr": plan.base_lr, "peak_lr": plan.peak_lr,
               "crop_scale_min": run.crop_scale[0], "world_size": run.info.world,
               "preset": run.params.model.preset, "train_images": len(run.train_set),
               "wall_time_s": wall_time_s, "dataset_digest": run.prepared.digest}
    if run.info.is_main:
        summary.update(_final_losses(run.model, run.prepared, run.params, run.device))
        _commit_outputs(run.model, run.resume, run.prepared, run.params, summary)
    return summary


def _restore(state: dict[str, Any], model: PiLaMIM, optimizer: torch.optim.Optimizer,
             mask_gen: torch.Generator) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    mask_gen.set_state(state["mask_generator"].cpu())
    torch.set_rng_state(state["cpu_rng"].cpu())


def _announce(resume: Resume, out_dir: Path, total_steps: int) -> None:
    """Say which checkpoint this run continues, and that a recipe change moved nothing."""
    if resume.other_reason:
        print(f"{out_dir / CHECKPOINT} belongs to other settings ({resume.other_reason}); it "
              f"stays as it is, and this recipe trains in {resume.path}, which replaces it "
              "only when this run completes")
    if resume.step:
        print(f"resuming from {resume.path} at step {resume.step}/{total_steps}")


def _commit_outputs(model: PiLaMIM, resume: Resume, prepared, params: Params,
                    summary: dict[str, Any]) -> None:
    """The run's outputs, together or not at all: this recipe's checkpoint becomes
    ``checkpoint.pt``, then the encoder, then ``metrics/pretrain.json`` (last: DVC and the
    next stages read it). A failure before the renames leaves the previous outputs intact."""
    p = params.pretrain
    out_dir = Path(p.out_dir)
    name, kwargs = model.encoder_spec()
    with OutputBatch() as batch:
        stage_promotion(resume, out_dir, batch)
        export_encoder(model.encoder, name, kwargs, out_dir,
                       extra={"mean": list(prepared.mean), "std": list(prepared.std),
                              "preset": params.model.preset, "dataset_digest": prepared.digest},
                       batch=batch)
        batch.write_json(p.metrics_path, summary)  # committed when the block ends
    prune_recipe_checkpoints(out_dir)


def knn_monitor_sets(prepared, params: Params,
                     max_bank: int = 3000) -> tuple[Subset, ManifestDataset]:
    """(memory bank, queries) for the kNN monitor, built once so each image is decoded once:
    at most ``max_bank`` training images, every n-th one (the manifest is in class order, so
    the first ``max_bank`` would leave classes out), and the val split (else test)."""
    tf = eval_transform(params.model.img_size, prepared.mean, prepared.std)
    train = ManifestDataset(prepared, "train", tf)
    bank = Subset(train, range(0, len(train), max(1, -(-len(train) // max_bank))))
    return bank, ManifestDataset(prepared, "val" if prepared.split("val") else "test", tf)


def _knn_monitor(model: PiLaMIM, bank: Subset, query: ManifestDataset, num_classes: int,
                 device: torch.device) -> dict[str, float]:
    """Cheap representation check while training: cosine kNN (k=20, T=0.07) of ``query`` on
    ``bank``. Pixel-only models score low here early on; a monitor, never a gate
    (docs/METHOD.md)."""
    feats, labels = extract_features(model.encoder, bank, 256, device)
    qfeats, qlabels = extract_features(model.encoder, query, 256, device)
    result = knn_metrics(feats, labels, qfeats, qlabels, num_classes)
    return {f"pretrain/{k}": v for k, v in result.items()}


def _check_finite(loss_sum: torch.Tensor, step: int, ckpt_path: Path, last_saved: int) -> None:
    value = float(loss_sum)
    if not math.isfinite(value):
        kept = (f"the last good checkpoint {ckpt_path} (step {last_saved}) is kept"
                if ckpt_path.exists() else "no checkpoint was written")
        raise NonFiniteLossError(
            f"pretraining loss became {value} by step {step}; {kept}. Lower the learning rate "
            "(pretrain.base_lr), set pretrain.grad_clip, or use pretrain.precision: fp32.")


@torch.no_grad()
def _final_losses(model: PiLaMIM, prepared, params: Params, device: torch.device,
                  max_images: int = 512) -> dict[str, float]:
    """Losses on the val split without augmentation, a fixed mask: comparable across runs."""
    split = "val" if prepared.split("val") else "train"
    ds = ManifestDataset(prepared, split, eval_transform(params.model.img_size, prepared.mean,
                                                         prepared.std))
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

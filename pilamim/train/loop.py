"""The pretraining loop: resumable, DDP-aware, no host sync per step on the GPU.

Reports through a :class:`pilamim.loggers.Logger`; writes the checkpoint, the exported encoder
and ``metrics/pretrain.json``. Its output folders are checked writable before anything else (a
read-only ``metrics/`` is not found after the training), and the end of a run (checkpoint
promotion, encoder, metrics JSON last) is one :class:`OutputBatch`: all of it appears, or none.
Which checkpoint a run resumes: :mod:`pilamim.train.checkpoint`; what watches the run learn
(loss means, the kNN monitor, reconstruction figures, final val losses):
:mod:`pilamim.train.monitors`.

A rerun may change ``epochs``. A checkpoint already past the new end is refused (nothing is
trained or written: :func:`pilamim.train.checkpoint.check_not_past_end`); otherwise the run
continues to the new end at the lr it started with, its lr and EMA curves recomputed over the
new length (:func:`run_schedule` says how and why), and ``metrics/pretrain.json`` records the
change.
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
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pilamim.config import Params, identity_values
from pilamim.data.prepared import PreparedDataset, load_prepared
from pilamim.data.pretrain_input import PretrainInput, pretrain_input
from pilamim.data.shard_reader import verify_shards
from pilamim.device import resolve_device
from pilamim.io import OutputBatch, ensure_writable
from pilamim.loggers import Logger, NullLogger
from pilamim.model import PiLaMIM
from pilamim.model.export import export_encoder
from pilamim.recipes import resolve_crop_scale
from pilamim.train.batch_layout import (
    LAYOUT,
    WorldSizeChangedError,
    layout,
    world_change,
    world_change_message,
)
from pilamim.train.checkpoint import (
    CHECKPOINT,
    KEYED_GLOB,
    Resume,
    Schedule,
    find_resume,
    prune_recipe_checkpoints,
    save_checkpoint,
    stage_promotion,
)
from pilamim.train.distributed import DistInfo, barrier, init_distributed, shutdown
from pilamim.train.flops import peak_flops, step_flops_per_image
from pilamim.train.monitors import LossMeter, build_monitors, final_losses, run_monitors
from pilamim.train.sampler import EpochSampler
from pilamim.train.step import LOSS_TERMS, Plan, StepResult, TrainStep, build_training


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left as it was."""


# Pretrain params that do not change what the checkpoint's state means (precision, compile and
# input_pipeline change rounding or resampling, not the recipe: a run may resume across them).
# ``epochs`` too: a run may be continued to more (find_resume refuses a checkpoint past the
# requested end; the checkpoint's Schedule keeps the lr the run started with).
_BOOKKEEPING = {"epochs", "data_dir", "out_dir", "metrics_path", "plots_path", "knn_plots_path",
                "device",
                "checkpoint_every_steps", "log_every_steps", "figure_every_epochs",
                "knn_every_epochs", "num_workers", "compile", "precision", "input_pipeline"}


def _meta(params: Params, in_chans: int, global_batch: int, digest: str,
          world: int) -> dict[str, Any]:
    """What a checkpoint's state means; the global batch, not its split over processes, is part
    of the recipe (:mod:`pilamim.train.batch_layout`)."""
    p = params.pretrain
    recipe = {k: v for k, v in p.model_dump(mode="json").items()
              if k not in _BOOKKEEPING and k not in ("batch_size", "accum_steps")}
    return {"model": identity_values("model", params.model.model_dump(mode="json")),
            "in_chans": in_chans,
            "global_batch": global_batch, "dataset_digest": digest, "recipe": recipe,
            LAYOUT: layout(p.batch_size, p.accum_steps, world)}


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
    plan = Plan(params, len(prepared.split("train")), world)
    meta = _meta(params, prepared.channels, plan.global_batch, prepared.digest, world)
    resume = find_resume(p.out_dir, meta, "cpu", epochs=p.epochs,
                         steps_per_epoch=plan.steps_per_epoch, mmap=True)
    _refuse_world_change(Path(p.out_dir), resume, meta)
    return resume.step


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
    schedule: Schedule  # the lrs it trains at (``plan`` uses them) and every change of length
    # The schedule's length changed at this resume and no checkpoint holds that yet: saved at
    # the end even if no step is left to train, so checkpoint and metrics agree.
    schedule_unsaved: bool = False
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


def _pretrain(params: Params, logger: Logger, info: DistInfo) -> dict[str, Any]:
    """The whole run at a glance; each step is its own function below, in the order the run
    takes them (which is also the order it draws from the RNGs: keep it)."""
    run = setup_run(params, info)
    resume_run(run)
    train_step = TrainStep(run.model, run.optimizer, run.plan, run.mask_gen, info, run.device)
    sampler = EpochSampler(len(run.train_set), info.world, info.rank, params.pretrain.seed,
                           chunks=[c["items"] for c in run.prepared.shards["train"]["chunks"]],
                           window=params.pretrain.shuffle_window_chunks)
    monitors = build_monitors(run.model, run.prepared, params, run.device, info.is_main)
    meter = LossMeter.zeros(run.device)
    t_start = time.perf_counter()
    progress = _progress_bar(run)
    try:  # a failed step (non-finite loss, interrupt) must not leave the bar open
        for epoch in range(run.step // run.plan.steps_per_epoch, params.pretrain.epochs):
            train_one_epoch(run, train_step, sampler, epoch, meter, logger, progress)
            run_monitors(monitors, run.model, epoch, run.step, meter, logger)
    finally:
        progress.close()
    if run.step != run.last_saved or run.schedule_unsaved:
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
    # A changed or truncated shard (or an S3 cache too small for the shuffle) fails here,
    # before any training.
    verify_shards(prepared, shuffled={"train": p.shuffle_window_chunks},
                  window_setting="pretrain.shuffle_window_chunks")
    # Decoded-image cache only in-process: workers would each hold (and drop) their own copy.
    crop_scale = resolve_crop_scale(p.crop_scale, params.model.img_size)
    train_input = pretrain_input(prepared, "train", params.model.img_size, crop_scale,
                                 p.hflip, p.input_pipeline, device,
                                 cache=None if p.num_workers == 0 else False)
    model, optimizer, plan, mask_gen = build_training(
        params, prepared.channels, len(train_input.dataset), info, device)
    meta = _meta(params, prepared.channels, plan.global_batch, prepared.digest, info.world)
    resume = find_resume(Path(p.out_dir), meta, device, epochs=p.epochs,
                         steps_per_epoch=plan.steps_per_epoch)
    _refuse_world_change(Path(p.out_dir), resume, meta)
    schedule = run_schedule(plan, p.epochs, resume)
    _use_schedule(plan, schedule)
    return Run(params, info, device, prepared, crop_scale, train_input, model, optimizer, plan,
               mask_gen, meta, resume, schedule,
               schedule_unsaved=_saved_schedule(resume) not in (None, schedule),
               flops_per_image=step_flops_per_image(params.model, prepared.channels,
                                                    model.patch_matmul),
               peak_flops=peak_flops(device))


def _refuse_world_change(out_dir: Path, resume: Resume, meta: dict[str, Any]) -> None:
    """Stop, before anything is written, a run that would start from step 0 only because it
    runs on another number of processes than the checkpoint it was meant to continue."""
    if resume.state is not None:
        return
    candidates = [out_dir / CHECKPOINT, *sorted(out_dir.glob(KEYED_GLOB))]
    found = world_change([c for c in candidates if c.is_file()], meta)
    if found is not None:
        raise WorldSizeChangedError(world_change_message(found[0], found[1], meta))


def run_schedule(plan: Plan, epochs: int, resume: Resume) -> Schedule:
    """The schedule this run trains under: its checkpoint's, continued to ``epochs``; resolved
    from ``plan`` when the run starts from step 0 (or its checkpoint predates stored schedules).

    What a changed ``epochs`` does, on purpose: ``base_lr``, ``peak_lr`` and ``warmup_steps``
    stay the stored ones (``base_lr: auto`` is not resolved again from the new length), and
    the cosine lr and the linear EMA momentum ramp are *recomputed* over the new total steps
    (``Plan.lr`` and ``Plan.momentum`` are functions of the step and the total only). From the
    resume step on, the run follows the curves of a run planned to the new length from the
    start, at the peak lr it started with. Extending a finished run thus raises the lr from
    ``min_lr`` to that curve's value at the resume step (a warm restart, as MAE's resume with a
    larger ``--epochs``) and lowers the momentum below its end value, so the target follows the
    encoder again. Not a stretched tail from the resume point: a finished run's tail sits at
    ``min_lr`` (0 by default) and the momentum at its end (1: a frozen target), so a stretched
    tail would train nothing; and a curve of the step and total alone needs no record of where
    it was stretched for an interrupted extension to resume to the same weights.
    """
    saved = _saved_schedule(resume)
    if saved is not None:
        return saved.resized(epochs, resume.step)
    return Schedule(base_lr=plan.base_lr, peak_lr=plan.peak_lr, warmup_steps=plan.warmup_steps,
                    started_epochs=epochs if resume.state is None else None, epochs=epochs)


def _saved_schedule(resume: Resume) -> Schedule | None:
    """The schedule stored in the checkpoint a run continues (None: none, or it predates it)."""
    if resume.state is None or "schedule" not in resume.state:
        return None
    return Schedule.from_state(resume.state["schedule"])


def _use_schedule(plan: Plan, schedule: Schedule) -> None:
    """Make ``plan`` step at the schedule's stored lrs (its total steps are already the
    requested epochs': :func:`run_schedule` says why the curves are recomputed over them)."""
    plan.base_lr, plan.peak_lr = schedule.base_lr, schedule.peak_lr
    plan.warmup_steps = schedule.warmup_steps


def resume_run(run: Run) -> None:
    """Apply the found checkpoint (model, optimizer, mask and CPU RNG state) and drop it from
    memory; rank 0 says what it continues and prunes other recipes' checkpoints."""
    barrier(run.info)  # every rank has read its state before rank 0 deletes anything
    if run.info.is_main:
        _announce(run)
        if run.resume.path.name != CHECKPOINT:
            prune_recipe_checkpoints(run.out_dir, protect=run.resume.path)
    run.step = run.last_saved = run.resume.step
    if run.resume.state is not None:
        _restore(run.resume.state, run.model, run.optimizer, run.mask_gen)
    run.resume = dataclasses.replace(run.resume, state=None)  # the state is not needed any more


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
                        mask_generator=run.mask_gen, meta=run.meta, schedule=run.schedule)
    run.last_saved = run.step
    run.schedule_unsaved = False


def export_outputs(run: Run, wall_time_s: float) -> dict[str, Any]:
    """The run's summary; rank 0 adds the val losses and commits checkpoint, encoder and
    metrics JSON together (:func:`_commit_outputs`).

    ``epochs`` and ``steps`` are what the exported encoder trained; ``base_lr``, ``peak_lr``
    and ``warmup_steps`` what it trained at; ``started_epochs`` the length the run started
    with (null: its checkpoint predates stored schedules), ``schedule_changes`` each resume that
    changed the length (:class:`pilamim.train.checkpoint.Schedule`).
    """
    p, plan = run.params.pretrain, run.plan
    _check_trained_as_requested(run)
    summary = {"steps": run.step, "epochs": p.epochs, "global_batch": plan.global_batch,
               "base_lr": plan.base_lr, "peak_lr": plan.peak_lr,
               "warmup_steps": plan.warmup_steps, "started_epochs": run.schedule.started_epochs,
               "schedule_changes": [dict(c) for c in run.schedule.changes],
               "crop_scale_min": run.crop_scale[0], "world_size": run.info.world,
               "preset": run.params.model.preset, "train_images": len(run.train_set),
               "wall_time_s": wall_time_s, "dataset_digest": run.prepared.digest}
    if run.info.is_main:
        summary.update(final_losses(run.model, run.prepared, run.params, run.device))
        _commit_outputs(run.model, run.resume, run.prepared, run.params, summary)
    return summary


def _restore(state: dict[str, Any], model: PiLaMIM, optimizer: torch.optim.Optimizer,
             mask_gen: torch.Generator) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    mask_gen.set_state(state["mask_generator"].cpu())
    torch.set_rng_state(state["cpu_rng"].cpu())


def _check_trained_as_requested(run: Run) -> None:
    """``metrics/pretrain.json`` records ``pretrain.epochs``: it must be what the encoder
    trained (find_resume refuses a checkpoint past the end; this keeps any other path out)."""
    if run.step != run.plan.total_steps:
        raise RuntimeError(
            f"the run stopped at step {run.step}, not at the {run.plan.total_steps} steps of "
            f"pretrain.epochs={run.params.pretrain.epochs}; nothing was exported")


def _announce(run: Run) -> None:
    """Say which checkpoint this run continues, that a recipe change moved nothing, and what a
    changed length does to the lr and EMA schedules."""
    resume, plan, schedule = run.resume, run.plan, run.schedule
    if resume.other_reason:
        print(f"{run.out_dir / CHECKPOINT} belongs to other settings ({resume.other_reason}); "
              f"it stays as it is, and this recipe trains in {resume.path}, which replaces it "
              "only when this run completes")
    if resume.step:
        print(f"resuming from {resume.path} at step {resume.step}/{plan.total_steps}")
    p = run.params.pretrain
    if resume.state is not None and "schedule" not in resume.state and p.base_lr == "auto" \
            and p.lr is None:
        print(f"{resume.path} stores no schedule (written before schedules were stored): "
              f"base_lr 'auto' is resolved from the requested {p.epochs} epochs "
              f"({plan.base_lr:.4g}, peak lr {plan.peak_lr:.4g}), the lr it trained at only if "
              f"it was started with {p.epochs} epochs; its checkpoint keeps this lr from now on")
    if run.schedule_unsaved:
        change = schedule.changes[-1]
        longer = change["to_epochs"] > change["from_epochs"]
        print(f"schedule {'extended' if longer else 'shortened'} from {change['from_epochs']} "
              f"to {change['to_epochs']} epochs at step "
              f"{resume.step}: the warm-up ({plan.warmup_steps} steps) + cosine lr and the EMA "
              f"momentum ramp are recomputed over {plan.total_steps} steps (next: lr "
              f"{plan.lr(resume.step):.4g}, momentum {plan.momentum(resume.step):.6g}), at the "
              f"peak lr {plan.peak_lr:.4g} (base lr {plan.base_lr:.4g}) the run started with")


def _commit_outputs(model: PiLaMIM, resume: Resume, prepared: PreparedDataset, params: Params,
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


def _check_finite(loss_sum: torch.Tensor, step: int, ckpt_path: Path, last_saved: int) -> None:
    value = float(loss_sum)
    if not math.isfinite(value):
        kept = (f"the last good checkpoint {ckpt_path} (step {last_saved}) is kept"
                if ckpt_path.exists() else "no checkpoint was written")
        raise NonFiniteLossError(
            f"pretraining loss became {value} by step {step}; {kept}. Lower the learning rate "
            "(pretrain.base_lr), set pretrain.grad_clip, or use pretrain.precision: fp32.")

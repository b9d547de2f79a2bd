"""One optimizer step of PiLaMIM pretraining, shared by the training loop and the benchmarks.

Everything a step needs is built once by :func:`build_training`; the step itself does no host
sync (losses stay on the device) so the GPU never waits for Python.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from pilamim.config import Params
from pilamim.device import autocast, autocast_dtype
from pilamim.model import PiLaMIM, build_pilamim
from pilamim.recipes import resolve_base_lr
from pilamim.schedules import cosine_with_warmup, linear
from pilamim.train.distributed import DistInfo
from pilamim.train.optim import build_adamw

LOSS_TERMS = ("loss", "loss_pixel", "loss_latent", "loss_cls", "feature_std")


class Plan:
    """Batch sizes and step counts derived once from params, data size and world size."""

    def __init__(self, params: Params, train_size: int, world: int) -> None:
        p = params.pretrain
        self.params = params
        self.global_batch = p.batch_size * p.accum_steps * world
        self.steps_per_epoch = train_size // (p.batch_size * world) // p.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split has {train_size} images, fewer than one global batch of "
                f"{self.global_batch} (batch_size {p.batch_size} x accum_steps {p.accum_steps} x "
                f"{world} processes); lower pretrain.batch_size or use more data")
        self.total_steps = p.epochs * self.steps_per_epoch
        self.warmup_steps = round(p.warmup_epochs * self.steps_per_epoch)
        self.base_lr = resolve_base_lr(p.base_lr, self.total_steps)
        self.peak_lr = p.lr if p.lr is not None else self.base_lr * self.global_batch / 256

    def lr(self, step: int) -> float:
        p = self.params.pretrain
        if p.schedule_unit == "epoch":  # official code: one value per epoch
            step = (step // self.steps_per_epoch) * self.steps_per_epoch
        return cosine_with_warmup(step, self.total_steps, self.warmup_steps, self.peak_lr,
                                  p.min_lr)

    def momentum(self, step: int) -> float:
        start, end = self.params.pretrain.ema_momentum
        return linear(step, self.total_steps, start, end)


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # summed over micro-batches, on the device
    grad_norm: torch.Tensor | None
    lr: float
    momentum: float


class TrainStep:
    """Accumulate gradients over micro-batches, set lr, clip, step AdamW, update the EMA."""

    def __init__(self, model: PiLaMIM, optimizer: torch.optim.Optimizer, plan: Plan,
                 mask_gen: torch.Generator, info: DistInfo, device: torch.device) -> None:
        p = plan.params.pretrain
        self.model, self.optimizer, self.plan = model, optimizer, plan
        self.mask_gen, self.info, self.device = mask_gen, info, device
        self.net = DistributedDataParallel(model) if info.enabled else model
        self.forward = torch.compile(self.net) if p.compile else self.net
        self.amp = autocast_dtype(device, p.precision)
        self.micro_batch, self.accum = p.batch_size, p.accum_steps
        self.grad_clip = p.grad_clip

    def noise(self) -> torch.Tensor:
        """This rank's rows of one global mask draw: ranks differ, and a DDP run equals a
        single-process run of the same global batch."""
        draw = torch.rand(self.micro_batch * self.info.world, self.model.num_patches,
                          generator=self.mask_gen, device=self.device)
        return draw[self.info.rank::self.info.world]

    def __call__(self, micro_batches: Iterable[torch.Tensor], step: int,
                 want_grad_norm: bool = False) -> StepResult:
        lr = self.plan.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = {k: torch.zeros((), device=self.device) for k in LOSS_TERMS}
        for micro, images in enumerate(micro_batches):
            sync = micro == self.accum - 1 or not self.info.enabled
            with (contextlib.nullcontext() if sync else self.net.no_sync()), \
                    autocast(self.device, self.amp):
                out = self.forward(images, self.noise())
            (out.loss / self.accum).backward()
            for k in LOSS_TERMS:
                value = getattr(out, k)
                if value is not None:
                    sums[k] += value.detach().float()
        grad_norm = None
        if self.grad_clip is not None or want_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       self.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        momentum = self.plan.momentum(step)
        self.model.update_target(momentum)
        return StepResult(sums, grad_norm, lr, momentum)


def build_training(params: Params, in_chans: int, train_size: int, info: DistInfo,
                   device: torch.device) -> tuple[PiLaMIM, torch.optim.Optimizer, Plan,
                                                   torch.Generator]:
    """Model, optimizer, plan and mask generator, seeded identically on every rank."""
    p = params.pretrain
    plan = Plan(params, train_size, info.world)
    torch.manual_seed(p.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = build_pilamim(params.model, in_chans).to(device)
    optimizer = build_adamw(model, plan.peak_lr, p.weight_decay, p.betas, p.decay_all_params,
                            device)
    mask_gen = torch.Generator(device=device).manual_seed(p.seed)
    return model, optimizer, plan, mask_gen

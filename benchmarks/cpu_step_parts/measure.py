"""What :mod:`benchmarks.cpu_step` measures, one function per record kind (the CLI lives there).

Each ``run_*`` takes a setting dict (``params_dir``, ``overrides``, ``steps``, ``warmup``,
``channels``, ``classes``, ``precision``, and ``compile`` or ``step``) and returns its fields.
"""

from __future__ import annotations

import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.throughput_parts.flops import analytic_flops
from benchmarks.throughput_parts.step import _Timer, loss_match_fields, reference_losses

LINEARS = {"qkv": (1, 3), "proj": (1, 1), "fc1": (1, 4), "fc2": (4, 1)}  # (in, out) x width
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU = torch.device("cpu")


def load(s: dict[str, Any], *forced: str):
    """The setting's params: its folder, the user's ``--set``s, then what the setting forces."""
    from pilamim.params_files import load_params

    return load_params(s["params_dir"], [*s["overrides"], *forced])


def matmul_shapes(params, step: str) -> dict[str, tuple[int, int, int]]:
    """(rows, in, out) of each encoder linear, per encoder the ``step`` runs."""
    from pilamim.model.encoder import ENCODER_SIZES
    from pilamim.model.masking import num_visible
    from pilamim.model.pilamim import PRESETS

    m = params.model
    dim, n = ENCODER_SIZES[m.size][1], (m.img_size // m.patch_size) ** 2
    if step == "finetune":
        rows = {"encoder": params.finetune.batch_size * (1 + n)}
    else:
        rows = {"encoder": params.pretrain.batch_size * (1 + num_visible(n, m.mask_ratio))}
        if PRESETS[m.preset].needs_target:
            rows["target"] = params.pretrain.batch_size * (1 + n)
    return {f"{where}.{name}": (r, dim * a, dim * b) for where, r in rows.items()
            for name, (a, b) in LINEARS.items()}


def time_mm(rows: int, k: int, n: int, dtype: torch.dtype, samples: int) -> float:
    """Median seconds of one ``torch.mm``; a sample repeats it for >= 10 ms, so that timer
    resolution does not decide the small shapes."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(n, k, generator=g).to(dtype).t()  # nn.Linear's weight layout
    torch.mm(a, b)
    t0 = time.perf_counter()
    torch.mm(a, b)
    calls = max(1, math.ceil(0.01 / max(time.perf_counter() - t0, 1e-7)))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def run_matmul(s: dict[str, Any]) -> dict[str, Any]:
    """Every encoder linear of ``s["step"]`` as a plain ``torch.mm`` (forward shapes, weight
    transposed as ``F.linear`` has it), each once: per shape and all together."""
    shapes, flops, seconds = {}, 0.0, 0.0
    for name, (m, k, n) in matmul_shapes(load(s), s["step"]).items():
        t = time_mm(m, k, n, DTYPES[s["precision"]], s["steps"])
        shapes[name] = {"m": m, "k": k, "n": n, "ms": t * 1e3,
                        "gflop_per_s": 2 * m * k * n / t / 1e9}
        flops, seconds = flops + 2 * m * k * n, seconds + t
    # Each shape once: the plain-matmul rate of the step's encoder work.
    return {"shapes": shapes, "gflop_per_s": flops / seconds / 1e9}


def timed(step: Callable[[int], torch.Tensor], warmup: int, steps: int,
          images: int, flops_per_image: float) -> dict[str, Any]:
    """Warm-up steps, then the median of ``steps``. ``compile_s`` is the warm-up's time: with
    compile on, mostly compiling (less when inductor's on-disk cache already holds the graphs
    from an earlier run). ``step(at)`` runs step ``at`` and returns its loss."""
    t0 = time.perf_counter()
    first = float(step(0))
    for at in range(1, warmup):
        step(at)
    out: dict[str, Any] = {"loss": first, "compile_s": time.perf_counter() - t0}
    timer, total = _Timer(CPU, steps), torch.zeros(())
    for i in range(steps):
        timer.start(i)
        total += step(warmup + i).detach()
        timer.stop(i)
    times = timer.result()
    median = statistics.median(times)
    rate = images / median
    return {**out, "images_per_s": rate, "step_ms_median": median * 1e3,
            "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
            "loss_finite": bool(torch.isfinite(total)), "flops_per_image": flops_per_image,
            "achieved_gflop_per_s": flops_per_image * rate / 1e9}


def run_pretrain(s: dict[str, Any]) -> dict[str, Any]:
    """``TrainStep`` as in benchmarks.throughput (micro-batches already on the device); step 0's
    loss against a plain eager fp32 forward of the same weights, images and mask."""
    from pilamim.train.distributed import DistInfo
    from pilamim.train.flops import step_flops_per_image
    from pilamim.train.step import TrainStep, build_training

    params = load(s, f"pretrain.precision={s['precision']}", "pretrain.device=cpu",
                  f"pretrain.compile={str(s['compile']).lower()}")
    p, info, t0 = params.pretrain, DistInfo(), time.perf_counter()
    model, optimizer, plan, mask_gen = build_training(
        params, s["channels"], p.batch_size * p.accum_steps * 10_000, info, CPU)
    train_step = TrainStep(model, optimizer, plan, mask_gen, info, CPU)
    g = torch.Generator().manual_seed(p.seed + 1)
    size = params.model.img_size
    micro = [torch.randn(p.batch_size, s["channels"], size, size, generator=g)] * p.accum_steps
    ref = reference_losses(model, train_step, micro)
    losses: dict[str, float] = {}

    def step(at: int) -> torch.Tensor:
        result = train_step(iter(micro), at)
        if at == 0:  # the step compared with the reference
            losses.update({k: float(v) for k, v in result.losses.items()})
        return result.losses["loss"]

    out = {"build_s": time.perf_counter() - t0, "batch": p.batch_size * p.accum_steps,
           **timed(step, s["warmup"], s["steps"], p.batch_size * p.accum_steps,
                   step_flops_per_image(params.model, s["channels"], model.patch_matmul))}
    return {**out, **loss_match_fields(losses, ref, s["precision"])}


def finetune_flops_per_image(params, channels: int, classes: int) -> float:
    """Model FLOPs of one fine-tune step per image, as ``step_flops_per_image`` counts them:
    the fine-tuned encoder runs the target encoder's forward (every patch and token) plus a
    backward, so 3 x its blocks, 2 x the patch embedding (no input gradient), 3 x the head."""
    from pilamim.model.encoder import ENCODER_SIZES

    m = params.model
    target = analytic_flops(m.size, "pilamim", m.img_size, m.patch_size, 1, 1, m.mask_ratio,
                            channels, depth=m.depth)["target_forward"]
    dim = ENCODER_SIZES[m.size][1]
    patch = 2 * (m.img_size // m.patch_size) ** 2 * channels * m.patch_size**2 * dim
    return 3 * target - patch + 3 * 2 * dim * classes


def run_finetune(s: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step as ``train_one_epoch`` runs it. No ``loss_match``: drop path draws
    from the global RNG, and a compiled graph draws differently from eager."""
    from pilamim.device import autocast_dtype
    from pilamim.evaluate.finetune import build_run, train_micro_batch
    from pilamim.evaluate.seeding import seeded
    from pilamim.model.export import export_encoder
    from pilamim.model.pilamim import build_pilamim
    from pilamim.schedules import cosine_with_warmup, set_lr

    params = load(s, f"finetune.precision={s['precision']}", "finetune.device=cpu",
                  "finetune.num_workers=0", "finetune.shuffle_window_chunks=null")
    p, t0, size = params.finetune, time.perf_counter(), params.model.img_size
    with tempfile.TemporaryDirectory() as encoder_dir, seeded(p.seed):
        pretrained = build_pilamim(params.model, s["channels"])
        export_encoder(pretrained.encoder, *pretrained.encoder_spec(), encoder_dir)
        n = p.batch_size * p.accum_steps
        data = torch.utils.data.TensorDataset(torch.randn(n, s["channels"], size, size),
                                              torch.randint(0, s["classes"], (n,)))
        run = build_run(encoder_dir, data, s["classes"], p, CPU)
    batches = list(itertools.islice(run.loader, run.accum))  # what the epoch's loader yields
    if s["compile"]:
        run.model = torch.compile(run.model)
    dtype = autocast_dtype(CPU, p.precision)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)

    def step(at: int) -> torch.Tensor:  # train_one_epoch's body for one optimizer step
        set_lr(run.optimizer, cosine_with_warmup(at, run.total, run.warmup, run.lr, p.min_lr))
        loss = sum(train_micro_batch(run, x, y, CPU, dtype) for x, y in batches)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return loss / (run.micro * run.accum)

    return {"build_s": time.perf_counter() - t0, "batch": run.micro * run.accum,
            **timed(step, s["warmup"], s["steps"], run.micro * run.accum,
                    finetune_flops_per_image(params, s["channels"], s["classes"]))}


RUNNERS = {"matmul": run_matmul, "pretrain": run_pretrain, "finetune": run_finetune}

"""Step mode: time the real :class:`pilamim.train.step.TrainStep` the way the loop calls it."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch

from benchmarks.throughput_parts.common import (
    H100_BF16_PEAK_TFLOPS,
    LOSS_MATCH_TOL,
    STEP_DEFAULTS,
    _resolve_device,
    _sync,
    free_memory,
)
from benchmarks.throughput_parts.flops import analytic_flops, flop_counter


def _precision_name(device: torch.device, precision: str) -> str:
    from pilamim.device import autocast_dtype

    return "fp32" if autocast_dtype(device, precision) is None else "bf16"


def step_params(s: dict[str, Any], **changes: Any):
    """Our typed ``Params`` for one step setting (validated like a params file)."""
    from pilamim.config import ModelParams, Params, PretrainParams

    s = {**s, **changes}
    model = ModelParams(preset=s["preset"], size=s["size"], depth=None,  # the size's own
                        img_size=s["img_size"],
                        patch_size=s["patch_size"], mask_ratio=s["mask_ratio"],
                        decoder_depth=s["decoder_depth"], decoder_width=s["decoder_width"],
                        decoder_heads=s["decoder_heads"])
    pretrain = PretrainParams(batch_size=s["batch"], accum_steps=s["accum"],
                              precision=s["precision"], compile=s["compile"], device=s["device"],
                              seed=s["seed"], epochs=100, warmup_epochs=0.0)
    return Params(model=model, pretrain=pretrain)


def build_step(s: dict[str, Any], device: torch.device, **changes: Any):
    from pilamim.train.distributed import DistInfo
    from pilamim.train.step import TrainStep, build_training

    params = step_params(s, **changes)
    p = params.pretrain
    info = DistInfo()
    train_size = p.batch_size * p.accum_steps * 10_000  # a long run: the lr schedule is flat
    model, optimizer, plan, mask_gen = build_training(params, 3, train_size, info, device)
    model.patch_matmul = s["patch_matmul"]  # False: timm's conv patch embedding, for comparison
    return model, TrainStep(model, optimizer, plan, mask_gen, info, device)


def _images(s: dict[str, Any], batch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(s["seed"] + 1)
    x = torch.randn(batch, 3, s["img_size"], s["img_size"], generator=g)
    return x.to(device)


def count_step_flops(s: dict[str, Any], model, step, device: torch.device) -> dict[str, Any]:
    """FLOPs per image of one full eager fp32 step (fwd + bwd + AdamW + EMA) at ``flop_batch``.

    The step is a sibling ``TrainStep`` over the benchmark's own model and optimizer, with
    ``compile: false``, ``precision: fp32`` and its own mask generator (the flop counter cannot
    see inside compiled graphs; FLOPs do not depend on the dtype). Every matmul/conv/attention
    that runs is counted once: the target encoder runs under ``no_grad`` and so contributes its
    forward only (also counted alone, as ``flops_target_forward_per_image``). Per-image FLOPs do
    not depend on the batch, so a small batch gives the full batch's figure.
    """
    from pilamim.train.step import Plan, TrainStep

    batch = s["flop_batch"] or min(s["batch"], 8 if device.type == "cuda" else 2)
    params = step_params(s, batch=batch, accum=1, compile=False, precision="fp32")
    plan = Plan(params, batch * 10_000, 1)
    gen = torch.Generator(device=device).manual_seed(s["seed"] + 2)
    eager = TrainStep(model, step.optimizer, plan, gen, step.info, device)
    images = _images(s, batch, device)
    with flop_counter() as counter:
        eager([images], 0)
    total = counter.get_total_flops()
    target = None
    if model.target is not None:
        with flop_counter() as counter, torch.no_grad():
            model.latent_targets(images)
        target = counter.get_total_flops() / batch
    del eager, images
    free_memory(device)
    return {"flops_per_image": total / batch, "flops_target_forward_per_image": target,
            "flop_batch": batch}


class _Timer:
    """Per-step times: CUDA events on the GPU (no sync between steps), perf_counter on CPU."""

    def __init__(self, device: torch.device, steps: int) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.times: list[float] = []
        if self.cuda:
            self.events = [(torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True)) for _ in range(steps)]

    def start(self, i: int) -> None:
        if self.cuda:
            self.events[i][0].record()
        else:
            self._t = time.perf_counter()

    def stop(self, i: int) -> None:
        if self.cuda:
            self.events[i][1].record()
        else:
            self.times.append(time.perf_counter() - self._t)

    def result(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.times = [a.elapsed_time(b) / 1e3 for a, b in self.events]
        return self.times


def _host_syncs(step, micro: list[torch.Tensor], at: int) -> dict[str, Any] | None:
    """Run one step under CUDA sync-debug mode and count the synchronising calls it makes."""
    if micro[0].device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(iter(micro), at)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message).splitlines()[0] for w in caught
             if "synchroniz" in str(w.message).lower()]
    return {"count": len(found), "first": found[:3]}


def _kernel_profile(step, micro: list[torch.Tensor], at: int, steps: int = 3,
                    top: int = 12) -> dict[str, Any]:
    """Where a step's device time goes: the top kernels and their share, from torch.profiler.

    The kernel total against the step's wall time also says how much of the step the GPU sits
    idle (launch overhead, host work), which decides between fusing kernels and CUDA graphs.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = micro[0].device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(micro[0].device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(iter(micro), at + i)
        _sync(micro[0].device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps

    def self_us(e) -> float:
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    if cuda:  # kernels only: CPU-side ops report no device time of their own
        events = [e for e in events if getattr(e, "device_type", None) is None
                  or "CUDA" in str(e.device_type)]
    total_us = sum(self_us(e) for e in events)
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return {"profiled_steps": steps, "profile_wall_ms_per_step": wall_ms,
            "kernel_ms_per_step": total_us / 1e3 / steps,
            "kernel_busy_fraction": (total_us / 1e3 / steps) / wall_ms if wall_ms else None,
            "top_kernels": [{"name": e.key[:120], "ms_per_step": self_us(e) / 1e3 / steps,
                             "share": self_us(e) / total_us if total_us else None,
                             "calls_per_step": e.count / steps} for e in ranked]}


def reference_losses(model, step, micro: list[torch.Tensor]) -> dict[str, float]:
    """The losses ``step`` is about to compute, from a plain eager fp32 forward of the same
    weights, images and mask (the noise the step will draw: its generator state is saved and
    restored), without grad (a loss does not depend on grad mode). Call it before the step."""
    from pilamim.train.step import LOSS_TERMS

    state = step.mask_gen.get_state()
    noises = [step.noise() for _ in micro]
    step.mask_gen.set_state(state)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            outs = [model(x, n) for x, n in zip(micro, noises, strict=True)]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return {k: sum(float(getattr(o, k)) for o in outs) for k in LOSS_TERMS
            if getattr(outs[0], k) is not None}


def loss_match_fields(got: dict[str, float], ref: dict[str, float],
                      precision: str) -> dict[str, Any]:
    """The relative gap of the step's losses (``got``) to the fp32 reference, and whether it is
    within :data:`LOSS_MATCH_TOL` for ``precision``."""
    rel = {k: abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref if k in got}
    return {"loss_ref_fp32": ref["loss"], "loss_match": rel["loss"],
            "loss_match_terms": {k: v for k, v in rel.items() if k != "loss"},
            "loss_match_tol": LOSS_MATCH_TOL[precision],
            "loss_match_ok": rel["loss"] <= LOSS_MATCH_TOL[precision]}


def run_step_setting(s: dict[str, Any]) -> dict[str, Any]:
    from pilamim.train.step import LOSS_TERMS

    s = {**STEP_DEFAULTS, **s}
    device = _resolve_device(s["device"])
    precision = _precision_name(device, s["precision"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {"precision_resolved": precision, "device": str(device)}

    t0 = time.perf_counter()
    model, step = build_step(s, device)
    if s["compile_mode"]:  # experiment knob: the loop compiles with the default mode
        step.forward = torch.compile(step.net, mode=s["compile_mode"])
    out["build_s"] = time.perf_counter() - t0
    out["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    t0 = time.perf_counter()
    out.update(count_step_flops(s, model, step, device))
    out["flop_count_s"] = time.perf_counter() - t0
    # Model FLOPs in the convention: the function's, every patch embedded (how we
    # compute it is ours to speed up); the counter sees what actually runs.
    analytic = analytic_flops(s["size"], s["preset"], s["img_size"], s["patch_size"],
                              s["decoder_depth"], s["decoder_width"], s["mask_ratio"],
                              patch_matmul=False)
    out["flops_analytic_per_image"] = analytic["total"]
    out["flops_analytic_sdpa_per_image"] = analytic_flops(
        s["size"], s["preset"], s["img_size"], s["patch_size"], s["decoder_depth"],
        s["decoder_width"], s["mask_ratio"], sdpa_recompute=True,
        patch_matmul=s["patch_matmul"])["total"]
    out["flops_analytic_parts"] = {k: v for k, v in analytic.items() if k != "total"}

    images = _images(s, s["batch"], device)
    micro = [images] * s["accum"]

    ref = reference_losses(model, step, micro) if s["loss_match"] else None
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Step 0: compiles when compile is on; its loss is the one compared with the reference.
    t0 = time.perf_counter()
    first = step(iter(micro), 0)
    got = {k: float(v) for k, v in first.losses.items() if k in (ref or first.losses)}
    out["first_step_s"] = time.perf_counter() - t0
    out["loss"] = got["loss"]
    if ref is not None:
        out.update(loss_match_fields(got, ref, precision))

    at = 1
    for _ in range(max(0, s["warmup"] - 1)):
        step(iter(micro), at)
        at += 1
    _sync(device)
    out["host_syncs_per_step"] = _host_syncs(step, micro, at)
    at += 1 if out["host_syncs_per_step"] is not None else 0

    sums = {k: torch.zeros((), device=device) for k in LOSS_TERMS}
    timer = _Timer(device, s["steps"])
    result = None
    _sync(device)
    wall = time.perf_counter()
    for i in range(s["steps"]):
        timer.start(i)
        result = step(iter(micro), at + i)
        for k, v in result.losses.items():  # what the loop does with every step's losses
            sums[k] += v
        timer.stop(i)
    times = timer.result()
    wall = time.perf_counter() - wall
    out["loss_finite"] = bool(torch.isfinite(sums["loss"]).item())
    if s["profile"]:
        try:
            out["profile"] = _kernel_profile(step, micro, at + s["steps"])
        except Exception as err:  # a profiler failure must not lose the timings
            out["profile"] = {"error": f"{type(err).__name__}: {err}"}

    images_per_step = s["batch"] * s["accum"]
    median = statistics.median(times)
    out.update(
        step_ms_median=median * 1e3, step_ms_mean=statistics.fmean(times) * 1e3,
        step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
        images_per_s=images_per_step / median,
        images_per_s_wall=images_per_step * len(times) / wall,
    )
    peak = s["peak_tflops"] or (H100_BF16_PEAK_TFLOPS if device.type == "cuda" else None)
    achieved = out["flops_per_image"] * out["images_per_s"]
    out["achieved_tflops"] = achieved / 1e12
    out["peak_tflops"] = peak
    out["mfu"] = achieved / (peak * 1e12) if peak else None
    out["mfu_model_flops"] = (out["flops_analytic_per_image"] * out["images_per_s"] / (peak * 1e12)
                              if peak else None)
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        out["peak_mem_gib"] = None
    del model, step, images, micro, result, first
    if s["compile"] or s["compile_mode"]:
        torch._dynamo.reset()
    free_memory(device)
    return out

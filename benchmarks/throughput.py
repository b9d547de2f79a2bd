"""Throughput of our real PiLaMIM training step and of the input pipeline, one JSON line each.

Step mode times :class:`pilamim.train.step.TrainStep` built by
:func:`pilamim.train.step.build_training` -- the objects ``pilamim pretrain`` uses, called the way
the loop calls them (a list of micro-batches already on the device, the mask noise drawn from
the step's own generator, the loss sums accumulated on the device). Per setting it reports the
median step time (CUDA events on a GPU, ``perf_counter`` on the CPU), images/s, peak memory,
FLOPs per image (``torch.utils.flop_counter`` over one full eager step), MFU, host syncs seen
inside one step, and ``loss_match``: the optimised (bf16 / compiled) step's loss against a plain
eager fp32 forward of the same weights, images and mask.

Data mode times the input pipeline alone on a folder of JPEGs (``--make-jpegs`` writes one):
the loop's own ``ManifestDataset`` + ``pretrain_transform`` in DataLoader workers with pinned
memory, then host->device; or, on a GPU, raw JPEG bytes read in workers and decoded +
cropped + resized on the GPU for the whole batch at once.

Usage (``python -m benchmarks.throughput -h`` lists every flag; benchmarks/README.md explains
the fields)::

    python -m benchmarks.throughput --size micro --img-size 16 --patch-size 4 --batch 4 \
        --steps 2 --warmup 1 --precision fp32 --no-compile
    python -m benchmarks.throughput --suite gpu --out results.jsonl --budget-s 480
    python -m benchmarks.throughput --make-jpegs 2048 /tmp/jpegs
    python -m benchmarks.throughput --data /tmp/jpegs --pipeline cpu,gpu --workers 8,15
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `pilamim` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# Dense bf16 peak of one H100 SXM / H200 (the figure the issue's MFU column uses).
H100_BF16_PEAK_TFLOPS = 989.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_SUFFIXES = (".jpeg", ".jpg")
# Relative |loss_optimised - loss_fp32| / |loss_fp32| accepted per precision.
LOSS_MATCH_TOL = {"fp32": 1e-4, "bf16": 2e-2}

STEP_DEFAULTS: dict[str, Any] = dict(
    mode="step", size="base", preset="pilamim", img_size=224, patch_size=16, batch=256,
    precision="auto", compile=False, compile_mode=None, decoder_depth=6, decoder_width=384,
    decoder_heads=12, mask_ratio=0.75, accum=1, steps=30, warmup=5, device="auto", seed=0,
    flop_batch=None, loss_match=True, peak_tflops=None, label=None,
)
DATA_DEFAULTS: dict[str, Any] = dict(
    mode="data", data=None, pipeline="cpu", workers=8, batch=256, img_size=224, batches=16,
    warmup_batches=2, device="auto", seed=0, label=None,
)
PIPELINES = ("cpu", "gpu", "gpu-loop")


# --------------------------------------------------------------------------------------------
# FLOPs


def analytic_flops(size: str, preset: str, img_size: int, patch_size: int, decoder_depth: int,
                   decoder_width: int, mask_ratio: float = 0.75, in_chans: int = 3,
                   sdpa_recompute: bool = False) -> dict[str, float]:
    """FLOPs per image of one training step (fwd + bwd), by part, from the layer shapes.

    Counts matmuls and convolutions only (2 FLOPs per multiply-add), like
    ``torch.utils.flop_counter``. A backward costs twice its forward, except the patch
    embedding (no gradient for the input image: weight gradient only) and the target encoder
    (``no_grad``: forward only). ``sdpa_recompute`` adds what fused attention's backward
    recomputes (the scores: 5 instead of 4 attention matmuls), which is what the flop counter
    charges for ``scaled_dot_product_attention``; the issue's 89.46 GFLOP is without it.
    """
    from pilamim.model.encoder import ENCODER_SIZES
    from pilamim.model.masking import num_visible
    from pilamim.model.pilamim import PRESETS

    _, dim, depth, _ = ENCODER_SIZES[size]
    weights = PRESETS[preset]
    n = (img_size // patch_size) ** 2
    keep = num_visible(n, mask_ratio)
    att_bwd = 2.5 if sdpa_recompute else 2.0

    def blocks(tokens: int, width: int, count: int, backward: bool) -> float:
        linear = 2 * 12 * tokens * width**2  # qkv 3d^2 + proj d^2 + fc1 4d^2 + fc2 4d^2
        attention = 2 * 2 * tokens**2 * width  # q @ k^T and attn @ v
        if not backward:
            return count * (linear + attention)
        return count * (3 * linear + (1 + att_bwd) * attention)

    patch = 2 * n * in_chans * patch_size**2 * dim
    parts = {"encoder": 2 * patch + blocks(1 + keep, dim, depth, True)}
    if weights.needs_target:
        parts["target_forward"] = patch + blocks(1 + n, dim, depth, False)

    def decoder(out_dim: int) -> float:
        linear = 2 * ((1 + keep) * dim * decoder_width + (1 + n) * decoder_width * out_dim)
        return 3 * linear + blocks(1 + n, decoder_width, decoder_depth, True)

    if weights.pixel > 0:
        parts["pixel_decoder"] = decoder(patch_size**2 * in_chans)
    if weights.needs_target:
        parts["latent_decoder"] = decoder(dim)
    parts["total"] = sum(parts.values())
    return parts


def _flop_counter(**kwargs):
    """``FlopCounterMode`` that also counts CPU fused attention (not in torch's registry)."""
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def fwd(q, k, v, *args, out_shape=None, **kw) -> int:
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kw) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping, **kwargs)


# --------------------------------------------------------------------------------------------
# Settings


def _resolve_device(name: str) -> torch.device:
    from pilamim.device import resolve_device

    return resolve_device(name)


def _precision_name(device: torch.device, precision: str) -> str:
    from pilamim.device import autocast_dtype

    return "fp32" if autocast_dtype(device, precision) is None else "bf16"


def _params(s: dict[str, Any], **changes: Any):
    """Our typed ``Params`` for one step setting (validated like a params file)."""
    from pilamim.config import ModelParams, Params, PretrainParams

    s = {**s, **changes}
    model = ModelParams(preset=s["preset"], size=s["size"], img_size=s["img_size"],
                        patch_size=s["patch_size"], mask_ratio=s["mask_ratio"],
                        decoder_depth=s["decoder_depth"], decoder_width=s["decoder_width"],
                        decoder_heads=s["decoder_heads"])
    pretrain = PretrainParams(batch_size=s["batch"], accum_steps=s["accum"],
                              precision=s["precision"], compile=s["compile"], device=s["device"],
                              seed=s["seed"], epochs=100, warmup_epochs=0.0)
    return Params(model=model, pretrain=pretrain)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _build(s: dict[str, Any], device: torch.device, **changes: Any):
    from pilamim.train.distributed import DistInfo
    from pilamim.train.step import TrainStep, build_training

    params = _params(s, **changes)
    p = params.pretrain
    info = DistInfo()
    train_size = p.batch_size * p.accum_steps * 10_000  # a long run: the lr schedule is flat
    model, optimizer, plan, mask_gen = build_training(params, 3, train_size, info, device)
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
    params = _params(s, batch=batch, accum=1, compile=False, precision="fp32")
    plan = Plan(params, batch * 10_000, 1)
    gen = torch.Generator(device=device).manual_seed(s["seed"] + 2)
    eager = TrainStep(model, step.optimizer, plan, gen, step.info, device)
    images = _images(s, batch, device)
    with _flop_counter() as counter:
        eager([images], 0)
    total = counter.get_total_flops()
    target = None
    if model.target is not None:
        with _flop_counter() as counter, torch.no_grad():
            model.latent_targets(images)
        target = counter.get_total_flops() / batch
    del eager, images
    _free(device)
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


def run_step_setting(s: dict[str, Any]) -> dict[str, Any]:
    from pilamim.train.step import LOSS_TERMS

    s = {**STEP_DEFAULTS, **s}
    device = _resolve_device(s["device"])
    precision = _precision_name(device, s["precision"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {"precision_resolved": precision, "device": str(device)}

    t0 = time.perf_counter()
    model, step = _build(s, device)
    if s["compile_mode"]:  # experiment knob: the loop compiles with the default mode
        step.forward = torch.compile(step.net, mode=s["compile_mode"])
    out["build_s"] = time.perf_counter() - t0
    out["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    t0 = time.perf_counter()
    out.update(count_step_flops(s, model, step, device))
    out["flop_count_s"] = time.perf_counter() - t0
    analytic = analytic_flops(s["size"], s["preset"], s["img_size"], s["patch_size"],
                              s["decoder_depth"], s["decoder_width"], s["mask_ratio"])
    out["flops_analytic_per_image"] = analytic["total"]
    out["flops_analytic_sdpa_per_image"] = analytic_flops(
        s["size"], s["preset"], s["img_size"], s["patch_size"], s["decoder_depth"],
        s["decoder_width"], s["mask_ratio"], sdpa_recompute=True)["total"]
    out["flops_analytic_parts"] = {k: v for k, v in analytic.items() if k != "total"}

    images = _images(s, s["batch"], device)
    micro = [images] * s["accum"]

    # Reference: the same weights, images and mask (the noise the step is about to draw),
    # plain eager fp32, no grad (a loss does not depend on grad mode).
    ref = None
    if s["loss_match"]:
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
        ref = {k: sum(float(getattr(o, k)) for o in outs) for k in LOSS_TERMS
               if getattr(outs[0], k) is not None}
        del outs, noises
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Step 0: compiles when compile is on; its loss is the one compared with the reference.
    t0 = time.perf_counter()
    first = step(iter(micro), 0)
    got = {k: float(v) for k, v in first.losses.items() if k in (ref or first.losses)}
    out["first_step_s"] = time.perf_counter() - t0
    out["loss"] = got["loss"]
    if ref is not None:
        out["loss_ref_fp32"] = ref["loss"]
        rel = {k: abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref if k in got}
        out["loss_match"] = rel["loss"]
        out["loss_match_terms"] = {k: v for k, v in rel.items() if k != "loss"}
        out["loss_match_tol"] = LOSS_MATCH_TOL[precision]
        out["loss_match_ok"] = rel["loss"] <= LOSS_MATCH_TOL[precision]

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
    _free(device)
    return out


# --------------------------------------------------------------------------------------------
# Input pipeline


def _jpeg_image(rng, width: int, height: int, noise: int = 12):
    """A random picture with structure (colour field, shapes, texture): ~60 KB at quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw

    low = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3),
                       dtype=np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(10, width // 2))
        y1 = y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    coarse = rng.integers(-noise, noise + 1, ((height + 1) // 2, (width + 1) // 2, 3),
                         dtype=np.int16).repeat(2, 0).repeat(2, 1)[:height, :width]
    fine = rng.integers(-(noise // 2), noise // 2 + 1, (height, width, 1), dtype=np.int16)
    arr = np.clip(np.asarray(img, np.int16) + coarse + fine, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# ImageNet's common shapes, roughly in proportion.
_JPEG_SHAPES = ((500, 375),) * 14 + ((375, 500),) * 3 + ((500, 333),) * 2 + ((500, 400),)


def _write_jpeg(job: tuple[int, str, int]) -> int:
    import numpy as np

    index, path, seed = job
    rng = np.random.default_rng((seed, index))
    width, height = _JPEG_SHAPES[int(rng.integers(len(_JPEG_SHAPES)))]
    buf = io.BytesIO()
    _jpeg_image(rng, width, height).save(buf, "JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_jpegs(count: int, root: str | Path, classes: int = 10, seed: int = 0,
               processes: int | None = None) -> dict[str, Any]:
    """Write ``count`` ImageNet-like JPEGs under ``root/<class>/``; existing files are kept."""
    import multiprocessing

    root = Path(root)
    jobs = []
    for i in range(count):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:07d}.JPEG"
        if not path.exists():
            jobs.append((i, str(path), seed))
    t0 = time.perf_counter()
    processes = processes or min(16, os.cpu_count() or 1)
    if len(jobs) > 16 and processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            list(pool.imap_unordered(_write_jpeg, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_jpeg(job)
    files = scan_jpegs(root)[0]
    sizes = [p.stat().st_size for p in files]
    return {"kind": "make_jpegs", "dir": str(root), "images": len(files), "written": len(jobs),
            "mean_kb": statistics.fmean(sizes) / 1e3 if sizes else 0.0,
            "seconds": time.perf_counter() - t0}


def scan_jpegs(root: str | Path) -> tuple[list[Path], list[str], list[str]]:
    """(paths, their class names, sorted classes) of ``root/<class>/*.jpg|jpeg``."""
    root = Path(root)
    paths = sorted(p for p in root.glob("*/*") if p.suffix.lower() in JPEG_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no JPEGs under {root}/<class>/; make some with "
                                f"--make-jpegs N {root}")
    labels = [p.parent.name for p in paths]
    return paths, labels, sorted(set(labels))


class RepeatedEpochs(torch.utils.data.Sampler):
    """The loop's :class:`EpochSampler` (``(index, seed)`` keys), epoch after epoch, until
    ``total`` samples: a small folder then gives as many batches as a benchmark needs."""

    def __init__(self, size: int, total: int, seed: int = 0) -> None:
        self.size, self.total, self.seed = size, total, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        from pilamim.train.sampler import EpochSampler

        sampler, epoch, n = EpochSampler(self.size, seed=self.seed), 0, 0
        while True:
            sampler.set_epoch(epoch)
            for key in sampler:
                yield key
                n += 1
                if n >= self.total:
                    return
            epoch += 1

    def __len__(self) -> int:
        return self.total


class JpegCrops(torch.utils.data.Dataset):
    """For GPU decoding: a worker reads the file's bytes and draws its RandomResizedCrop box and
    flip from the JPEG header alone, seeded by ``(index, seed)`` like ``ManifestDataset`` (so the
    augmentation stays a function of the sample, whatever the worker)."""

    def __init__(self, paths: list[Path], scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.paths, self.scale, self.ratio = paths, scale, ratio

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        import numpy as np
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        from pilamim.data.dataset import augmentation_seed

        index, seed = key
        path = self.paths[index]
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        with Image.open(path) as header, torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(index, seed))
            top, left, h, w = RandomResizedCrop.get_params(header, list(self.scale),
                                                           list(self.ratio))
            flip = bool(torch.rand(1) < 0.5)
        return data, (left, top, left + w, top + h), flip


def collate_jpeg_crops(batch):
    """One packed byte buffer + lengths (one shared-memory transfer per batch), boxes, flips."""
    datas, boxes, flips = zip(*batch, strict=True)
    lengths = torch.tensor([len(d) for d in datas])
    return (torch.cat(datas), lengths, torch.tensor(boxes, dtype=torch.float32),
            torch.tensor(flips))


class GpuCropResize:
    """Decode a batch of JPEGs on the device and crop-resize-flip-normalise it in a few kernels.

    ``method='roi'``: images are gathered into one edge-replicated canvas, then one
    ``torchvision.ops.roi_align`` crops and resizes every box
    (bilinear, averaging ceil(box/out) samples per output pixel: antialiased on downscale; not
    bit-equal to PIL bicubic). ``method='loop'``: per image ``F.interpolate(bicubic,
    antialias=True)`` in a Python loop (torchvision's tensor RandomResizedCrop, exactly).
    """

    def __init__(self, img_size: int, device: torch.device, method: str = "roi",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, max_canvas: int = 2**27) -> None:
        self.size, self.device, self.method, self.max_canvas = img_size, device, method, max_canvas
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def decode(self, buf: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = list(torch.split(buf, lengths.tolist()))
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)

    def __call__(self, buf: torch.Tensor, lengths: torch.Tensor, boxes: torch.Tensor,
                 flips: torch.Tensor) -> torch.Tensor:
        images = self.decode(buf, lengths)
        crops = self._roi(images, boxes) if self.method == "roi" else self._loop(images, boxes)
        flips = flips.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        crops = torch.where(flips, crops.flip(-1), crops)
        return (crops - self.mean) / self.std

    def _roi(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        out = torch.empty(len(images), 3, self.size, self.size, device=self.device)
        boxes = boxes.to(self.device, non_blocking=True)
        for chunk in self._chunks(images):
            index = torch.tensor(chunk, device=self.device)
            rois = torch.cat([torch.arange(len(chunk), device=self.device,
                                           dtype=boxes.dtype)[:, None], boxes[index]], dim=1)
            crops = roi_align(self._canvas([images[i] for i in chunk]), rois,
                              (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1,
                              aligned=True)
            out.index_copy_(0, index, crops)
        return out

    def _canvas(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, Hmax, Wmax) float, each image top-left, its edge pixels replicated outwards
        (so bilinear samples at a crop's border never see padding): one ``cat`` and three
        gathers, whatever the batch size, instead of a Python loop of copies."""
        dev = self.device
        hs, ws = [im.shape[1] for im in images], [im.shape[2] for im in images]
        flat = torch.cat([im.reshape(-1) for im in images])
        h = torch.tensor(hs, device=dev).view(-1, 1, 1)
        w = torch.tensor(ws, device=dev).view(-1, 1, 1)
        area = h * w
        start = torch.cumsum(3 * area, 0) - 3 * area  # CHW planes, one image after another
        y = torch.minimum(torch.arange(max(hs), device=dev).view(1, -1, 1), h - 1)
        x = torch.minimum(torch.arange(max(ws), device=dev).view(1, 1, -1), w - 1)
        pixel = start + y * w + x
        return torch.stack([flat[pixel + c * area] for c in range(3)], dim=1).float()

    def _chunks(self, images: list[torch.Tensor]) -> list[list[int]]:
        """Groups of similar-sized images whose padded canvas stays under ``max_canvas``."""
        order = sorted(range(len(images)), key=lambda i: images[i].shape[1] * images[i].shape[2])
        chunks: list[list[int]] = []
        current: list[int] = []
        hmax = wmax = 0
        for i in order:
            h, w = images[i].shape[1:]
            nh, nw = max(hmax, h), max(wmax, w)
            if current and (len(current) + 1) * 3 * nh * nw > self.max_canvas:
                chunks.append(current)
                current, nh, nw = [], h, w
            current.append(i)
            hmax, wmax = nh, nw
        return chunks + [current] if current else chunks

    def _loop(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        out = []
        for img, (x1, y1, x2, y2) in zip(images, boxes.round().int().tolist(), strict=True):
            crop = img[:, y1:y2, x1:x2].unsqueeze(0).float()
            out.append(F.interpolate(crop, size=(self.size, self.size), mode="bicubic",
                                     antialias=True, align_corners=False).clamp_(0, 255))
        return torch.cat(out)


def _data_loader(s: dict[str, Any], device: torch.device):
    """(DataLoader, function batch -> normalised (B, 3, S, S) float tensor on the device)."""
    from torch.utils.data import DataLoader

    paths, labels, classes = scan_jpegs(s["data"])
    total = (s["batches"] + s["warmup_batches"]) * s["batch"]
    sampler = RepeatedEpochs(len(paths), total, s["seed"])
    common = dict(batch_size=s["batch"], sampler=sampler, drop_last=True,
                  num_workers=s["workers"], pin_memory=device.type == "cuda",
                  persistent_workers=False)
    if s["pipeline"] == "cpu":  # what the pretraining loop runs
        from pilamim.data.dataset import ManifestDataset
        from pilamim.data.prepared import PreparedDataset, Record
        from pilamim.data.transforms import pretrain_transform

        root = Path(s["data"]).resolve()
        records = [Record(p.relative_to(root).as_posix(), label, "train", "")
                   for p, label in zip(paths, labels, strict=True)]
        prepared = PreparedDataset(root=root, classes=classes, channels=3, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD, digest="benchmark", records=records)
        transform = pretrain_transform(s["img_size"], IMAGENET_MEAN, IMAGENET_STD)
        dataset = ManifestDataset(prepared, "train", transform, cache=False)
        loader = DataLoader(dataset, **common)

        def to_device(batch):
            return batch[0].to(device, non_blocking=True)

        return loader, to_device
    if device.type != "cuda" and s["device"] != "cpu":
        raise RuntimeError(f"pipeline {s['pipeline']!r} decodes on the GPU and no GPU is "
                           "visible (pass --device cpu to exercise it on the CPU, for tests)")
    gpu = GpuCropResize(s["img_size"], device, "roi" if s["pipeline"] == "gpu" else "loop")
    loader = DataLoader(JpegCrops(paths), collate_fn=collate_jpeg_crops, **common)
    return loader, lambda batch: gpu(*batch)


def run_data_setting(s: dict[str, Any]) -> dict[str, Any]:
    s = {**DATA_DEFAULTS, **s}
    if s["pipeline"] not in PIPELINES:
        raise ValueError(f"pipeline {s['pipeline']!r}: one of {PIPELINES}")
    device = _resolve_device(s["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader, produce = _data_loader(s, device)
    t0 = time.perf_counter()
    batches = iter(loader)
    for _ in range(s["warmup_batches"]):
        produce(next(batches))
    _sync(device)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(s["batches"]):
        x = produce(next(batches))
        n += x.shape[0]
    _sync(device)
    elapsed = time.perf_counter() - t0
    x = x.float()
    out = {"device": str(device), "images": n, "seconds": elapsed,
           "images_per_s": n / elapsed, "startup_s": startup, "shape": list(x.shape),
           "batch_mean": float(x.mean()), "batch_std": float(x.std()),
           "cpu_count": os.cpu_count()}
    out["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                           if device.type == "cuda" else None)
    del batches, loader, x
    _free(device)
    return out


# --------------------------------------------------------------------------------------------
# Running settings


def run_setting(s: dict[str, Any]) -> dict[str, Any]:
    """One setting in this process; failures become a record with ``ok: false``."""
    mode = s.get("mode", "step")
    full = {**(STEP_DEFAULTS if mode == "step" else DATA_DEFAULTS), **s}
    record: dict[str, Any] = {"kind": mode, "setting": full, "ok": True, "error": None}
    t0 = time.perf_counter()
    try:
        record.update(run_step_setting(full) if mode == "step" else run_data_setting(full))
    except Exception as err:  # a failed setting must not lose the others
        record.update(ok=False, error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc(limit=8)[-3000:])
        _free(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    record["elapsed_s"] = time.perf_counter() - t0
    return record


def run_isolated(s: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One setting in a fresh Python process (own CUDA context, compile caches, peak memory),
    killed with its whole process group (inductor workers too) after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--run-setting", json.dumps(s)]
    env = {**os.environ, **{k: str(v) for k, v in (s.get("env") or {}).items()}}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
        error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        error = f"timed out after {timeout:.0f} s (killed)"
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if lines and error is None:
        return json.loads(lines[-1])
    mode = s.get("mode", "step")
    return {"kind": mode, "setting": {**(STEP_DEFAULTS if mode == "step" else DATA_DEFAULTS),
                                      **s},
            "ok": False, "error": error or "no result line", "elapsed_s": time.perf_counter() - t0}


def gpu_suite(jpeg_dir: str, cpu_count: int | None = None) -> list[dict[str, Any]]:
    """The issue's matrix, cheapest and safest first (compiled settings last)."""
    vit_b = dict(mode="step", size="base", img_size=224, patch_size=16, batch=256,
                 precision="bf16", steps=30, warmup=5)
    pilamim = dict(vit_b, preset="pilamim", decoder_depth=6, decoder_width=384, decoder_heads=12)
    mae = dict(vit_b, preset="mae", decoder_depth=8, decoder_width=512, decoder_heads=16)
    cores = cpu_count or os.cpu_count() or 1
    data = dict(mode="data", data=jpeg_dir, batch=256, img_size=224, batches=16,
                warmup_batches=2, timeout=90)
    return [
        dict(pilamim, compile=False, timeout=150, label="pilamim-b16-bf16-eager"),
        dict(mae, compile=False, timeout=150, label="mae-b16-dec8x512-bf16-eager"),
        *[dict(data, pipeline="cpu", workers=w, label=f"data-cpu-{w}w")
          for w in sorted({max(1, cores - 1), max(1, cores // 2)}, reverse=True)],
        dict(data, pipeline="gpu", workers=4, label="data-gpu-roi-4w"),
        dict(data, pipeline="gpu-loop", workers=4, label="data-gpu-loop-4w"),
        dict(pilamim, compile=True, timeout=330, label="pilamim-b16-bf16-compiled"),
        dict(mae, compile=True, timeout=300, label="mae-b16-dec8x512-bf16-compiled"),
    ]


def smoke_suite(jpeg_dir: str) -> list[dict[str, Any]]:
    """The same shape of matrix with a micro model on the CPU (checks the machinery)."""
    micro = dict(mode="step", size="micro", img_size=16, patch_size=4, batch=4, precision="fp32",
                 steps=2, warmup=1, decoder_depth=1, decoder_width=16, decoder_heads=2,
                 device="cpu")
    data = dict(mode="data", data=jpeg_dir, batch=4, img_size=32, batches=2, warmup_batches=1,
                device="cpu")
    return [dict(micro, preset="pilamim", label="micro-pilamim"),
            dict(micro, preset="mae", label="micro-mae"),
            dict(data, pipeline="cpu", workers=1, label="data-cpu-1w"),
            dict(data, pipeline="gpu", workers=0, label="data-gpu-roi-on-cpu")]


def _environment() -> dict[str, Any]:
    import timm
    import torchvision

    env = {"kind": "header", "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
           "cwd": os.getcwd(), "time": datetime.datetime.now().astimezone().isoformat(),
           "python": sys.version.split()[0], "torch": torch.__version__,
           "torchvision": torchvision.__version__, "timm": timm.__version__,
           "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


class _Emitter:
    def __init__(self, out: str | None) -> None:
        self.file = None
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(out, "a")  # closed in close()

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, allow_nan=True)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def summarize(path: str | Path) -> str:
    """A compact table of a results file (one row per setting), for logs and the README."""
    def num(value, fmt: str) -> str:
        width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()) or 0)
        return format(value, fmt) if isinstance(value, int | float) else "-".rjust(width)

    rows = [f"{'setting':34} {'ok':3} {'img/s':>8} {'ms/step':>8} {'MFU':>6} {'GiB':>6} "
            f"{'GFLOP/img':>9} {'loss_match':>10} {'syncs':>5} {'1st s':>6}  error"]
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") not in ("step", "data", "skipped"):
            continue
        st = r.get("setting", {})
        label = st.get("label") or (f"{st.get('preset')}-{st.get('size')}-b{st.get('batch')}-"
                                    f"{'compiled' if st.get('compile') else 'eager'}"
                                    if st.get("mode", "step") == "step" else
                                    f"data-{st.get('pipeline')}-{st.get('workers')}w")
        syncs = (r.get("host_syncs_per_step") or {}).get("count")
        flops = r.get("flops_per_image")
        rows.append(
            f"{label[:34]:34} {'yes' if r.get('ok') else 'NO':3}"
            f" {num(r.get('images_per_s'), '8.0f')}"
            f" {num(r.get('step_ms_median'), '8.1f')} {num(r.get('mfu'), '6.1%')}"
            f" {num(r.get('peak_mem_gib'), '6.1f')} {num(flops and flops / 1e9, '9.2f')}"
            f" {num(r.get('loss_match'), '10.1e')} {num(syncs, '5d')}"
            f" {num(r.get('first_step_s'), '6.1f')}  {(r.get('error') or '')[:60]}")
    return "\n".join(rows)


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Time PiLaMIM's real training step and/or the input pipeline; one JSON "
                    "line per setting on stdout (the first line echoes the command).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = STEP_DEFAULTS
    g = p.add_argument_group("training step")
    g.add_argument("--size", default=d["size"],
                   choices=["micro", "mini", "tiny", "small", "base", "large"])
    g.add_argument("--preset", default=d["preset"],
                   choices=["pilamim", "pilamim_nocls", "mae", "latent", "latent_cls"])
    g.add_argument("--img-size", type=int, default=d["img_size"])
    g.add_argument("--patch-size", type=int, default=d["patch_size"])
    g.add_argument("--batch", type=int, default=None,
                   help="per-step batch (step mode default 256; data mode 256)")
    g.add_argument("--accum", type=int, default=d["accum"], help="micro-batches per step")
    g.add_argument("--precision", default=d["precision"], choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (as the loop)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d["compile"],
                   help="torch.compile the step's forward (pretrain.compile)")
    g.add_argument("--compile-mode", default=None,
                   help="experiment: recompile with this torch.compile mode (the loop uses the "
                        "default), e.g. max-autotune-no-cudagraphs")
    g.add_argument("--decoder-depth", type=int, default=d["decoder_depth"])
    g.add_argument("--decoder-width", type=int, default=d["decoder_width"])
    g.add_argument("--decoder-heads", type=int, default=d["decoder_heads"])
    g.add_argument("--steps", type=int, default=d["steps"], help="timed steps (median taken)")
    g.add_argument("--warmup", type=int, default=d["warmup"],
                   help="untimed steps first (the first one compiles)")
    g.add_argument("--flop-batch", type=int, default=None,
                   help="batch of the eager step the FLOPs are counted on (default 8 on CUDA, "
                        "2 on CPU; FLOPs per image do not depend on it)")
    g.add_argument("--no-loss-match", dest="loss_match", action="store_false",
                   help="skip the fp32 reference forward")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak for MFU (default {H100_BF16_PEAK_TFLOPS:g} on CUDA; none on CPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("input pipeline")
    g.add_argument("--data", metavar="DIR", default=None,
                   help="time the input pipeline alone on DIR/<class>/*.JPEG")
    g.add_argument("--pipeline", type=_csv(str), default=["cpu"],
                   help=f"comma list of {', '.join(PIPELINES)}: cpu = ManifestDataset + "
                        "pretrain_transform in workers; gpu = bytes in workers, decode_jpeg + "
                        "roi_align crop on the GPU; gpu-loop = same with per-image bicubic")
    g.add_argument("--workers", type=_csv(int), default=[DATA_DEFAULTS["workers"]],
                   help="comma list of DataLoader worker counts")
    g.add_argument("--data-batches", type=int, default=DATA_DEFAULTS["batches"])
    g.add_argument("--data-warmup", type=int, default=DATA_DEFAULTS["warmup_batches"])
    g.add_argument("--make-jpegs", nargs=2, metavar=("N", "DIR"), default=None,
                   help="write N ImageNet-like JPEGs (~500x375, q90, ~60 KB) into DIR/<class>/")

    g = p.add_argument_group("several settings")
    g.add_argument("--settings", default=None,
                   help="JSON list of dicts, each overriding the flags' setting "
                        '(e.g. \'[{"compile": false}, {"compile": true}]\'); a dict may set '
                        '"mode": "data" and the data keys')
    g.add_argument("--suite", choices=["gpu", "smoke"], default=None,
                   help="gpu: the issue's matrix (ViT-B/16 b256 bf16 pilamim and mae 8x512, "
                        "eager + compiled, and the input pipelines); smoke: same shape, micro, CPU")
    g.add_argument("--jpeg-dir", default="/tmp/pilamim-bench-jpegs",
                   help="where --suite finds (or makes) its JPEGs")
    g.add_argument("--jpeg-count", type=int, default=2048, help="JPEGs --suite makes if missing")
    g.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each setting in its own process (default: on for --suite)")
    g.add_argument("--setting-timeout", type=float, default=300.0,
                   help="seconds per isolated setting (a setting's own \"timeout\" key wins)")
    g.add_argument("--budget-s", type=float, default=None,
                   help="stop starting settings when this many seconds have passed")
    g.add_argument("--only", type=_csv(str), default=None,
                   help="comma list: keep the settings whose label contains one of these "
                        "(e.g. --suite gpu --only compiled)")
    g.add_argument("--list", action="store_true", help="print the settings and exit")
    g.add_argument("--out", default=None, help="also append the JSON lines to this file")
    g.add_argument("--summarize", metavar="FILE", default=None,
                   help="print a table of a results file (from --out) and exit")
    g.add_argument("--run-setting", default=None, help=argparse.SUPPRESS)
    return p


def settings_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    grid = _grid(args)
    if args.only:
        grid = [s for s in grid if any(part in (s.get("label") or "") for part in args.only)]
    return grid


def _grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.suite == "gpu":
        return gpu_suite(args.jpeg_dir)
    if args.suite == "smoke":
        return smoke_suite(args.jpeg_dir)
    if args.data:
        base = dict(mode="data", data=args.data, batch=args.batch or DATA_DEFAULTS["batch"],
                    img_size=args.img_size, batches=args.data_batches,
                    warmup_batches=args.data_warmup, device=args.device, seed=args.seed)
        grid = [dict(base, pipeline=pipe, workers=w) for pipe in args.pipeline
                for w in args.workers]
    else:
        grid = [dict(mode="step", size=args.size, preset=args.preset, img_size=args.img_size,
                     patch_size=args.patch_size, batch=args.batch or STEP_DEFAULTS["batch"],
                     accum=args.accum, precision=args.precision, compile=args.compile,
                     compile_mode=args.compile_mode, decoder_depth=args.decoder_depth,
                     decoder_width=args.decoder_width, decoder_heads=args.decoder_heads,
                     steps=args.steps, warmup=args.warmup, flop_batch=args.flop_batch,
                     loss_match=args.loss_match, peak_tflops=args.peak_tflops,
                     device=args.device, seed=args.seed)]
    if args.settings:
        overrides = json.loads(args.settings)
        if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
            raise SystemExit("--settings: expected a JSON list of objects")
        grid = [{**base, **o} for base in grid for o in overrides]
    for s in grid:
        if s.get("mode", "step") == "data":
            s.setdefault("data", args.data or args.jpeg_dir)
    return grid


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_setting:  # child of an isolated run: one result line, no header
        print(json.dumps(run_setting(json.loads(args.run_setting)), default=str), flush=True)
        return 0
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.list:
        for s in settings_from_args(args):
            print(json.dumps({"kind": "setting", "setting": s}))
        return 0
    t_start = time.perf_counter()
    emit = _Emitter(args.out)
    try:
        emit(_environment())
        if args.make_jpegs:
            emit(make_jpegs(int(args.make_jpegs[0]), args.make_jpegs[1]))
            if not (args.data or args.suite or args.settings):
                return 0
        settings = settings_from_args(args)
        if args.suite and any(s.get("mode") == "data" for s in settings):
            jpegs = list(Path(args.jpeg_dir).glob("*/*.JPEG"))
            if len(jpegs) < args.jpeg_count:
                emit(make_jpegs(args.jpeg_count, args.jpeg_dir))
        isolate = args.isolate if args.isolate is not None else bool(args.suite)
        failed = 0
        for s in settings:
            left = math.inf if args.budget_s is None else (
                args.budget_s - (time.perf_counter() - t_start))
            if left < 30:
                emit({"kind": "skipped", "setting": s, "ok": False,
                      "error": f"--budget-s {args.budget_s:g} spent"})
                failed += 1
                continue
            if isolate:
                record = run_isolated(s, min(s.get("timeout", args.setting_timeout), left - 5))
            else:
                record = run_setting(s)
            failed += not record.get("ok", False)
            emit(record)
        return 1 if failed else 0
    finally:
        emit.close()


if __name__ == "__main__":
    sys.exit(main())

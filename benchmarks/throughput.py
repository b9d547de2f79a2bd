"""Throughput of our real PiLaMIM training step and of the input pipeline, one JSON line each.

Step mode times :class:`pilamim.train.step.TrainStep` built by
:func:`pilamim.train.step.build_training` -- the objects ``pilamim pretrain`` uses, called the way
the loop calls them (a list of micro-batches already on the device, the mask noise drawn from
the step's own generator, the loss sums accumulated on the device). Per setting it reports the
median step time (CUDA events on a GPU, ``perf_counter`` on the CPU), images/s, peak memory,
FLOPs per image (``torch.utils.flop_counter`` over one full eager step), MFU, host syncs seen
inside one step, and ``loss_match``: the optimised (bf16 / compiled) step's loss against a plain
eager fp32 forward of the same weights, images and mask.

Data mode times the input pipeline alone on a folder of JPEGs (``--make-jpegs`` writes one),
built by the loop's own :func:`pilamim.data.pretrain_input.pretrain_input` (the three
``pretrain.input_pipeline`` choices): ``pil`` = ``ManifestDataset`` + ``pretrain_transform`` in
DataLoader workers with pinned memory, then host->device; ``device`` / ``device_bicubic`` = raw
bytes read in workers, decoded + cropped + resized on the GPU for the whole batch at once.

Usage (``python -m benchmarks.throughput -h`` lists every flag; benchmarks/README.md explains
the fields)::

    python -m benchmarks.throughput --size micro --img-size 16 --patch-size 4 --batch 4 \
        --steps 2 --warmup 1 --precision fp32 --no-compile
    python -m benchmarks.throughput --suite gpu --out results.jsonl --budget-s 480
    python -m benchmarks.throughput --make-jpegs 2048 /tmp/jpegs
    python -m benchmarks.throughput --data /tmp/jpegs --pipeline pil,device --workers 8,15
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `pilamim` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.throughput_parts.common import (  # noqa: E402
    DATA_DEFAULTS,
    H100_BF16_PEAK_TFLOPS,
    PIPELINES,
    STEP_DEFAULTS,
)
from benchmarks.throughput_parts.data import data_loader  # noqa: E402
from benchmarks.throughput_parts.flops import analytic_flops  # noqa: E402
from benchmarks.throughput_parts.jpegs import make_jpegs  # noqa: E402
from benchmarks.throughput_parts.step import step_params  # noqa: E402
from benchmarks.throughput_parts.suite import (  # noqa: E402
    Emitter,
    environment_info,
    gpu_suite,
    run_isolated,
    run_setting,
    smoke_suite,
    summarize,
)

# Names used by callers and tests of ``benchmarks.throughput`` (their homes: throughput_parts).
__all__ = ["DATA_DEFAULTS", "STEP_DEFAULTS", "data_loader", "step_params",
           "analytic_flops", "build_parser", "gpu_suite", "main", "make_jpegs", "run_setting",
           "settings_from_args", "summarize"]


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
    g.add_argument("--pipeline", type=_csv(str), default=["pil"],
                   help=f"comma list of {', '.join(PIPELINES)} (pretrain.input_pipeline): pil = "
                        "ManifestDataset + pretrain_transform in workers; device = bytes in "
                        "workers, decode_jpeg + roi_align crop on the GPU; device_bicubic = same "
                        "with per-image bicubic")
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
    emit = Emitter(args.out)
    try:
        emit(environment_info())
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

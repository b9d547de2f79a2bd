"""How fast the project's default model trains on this CPU, and how far that is from a plain matmul.

One JSON line per measurement on stdout; the first (``"kind": "header"``) echoes the exact
command and the machine. For the params of ``--params`` (the embedded default) and the
``--set`` overrides it measures, on the same threads (:mod:`.cpu_step_parts.measure`):

* ``matmul``: ``torch.mm`` in fp32 and bf16 at the shapes of the encoder's linears (qkv, proj,
  fc1, fc2) at the rows the step feeds them: batch x (1 + visible) for the pretrain encoder,
  batch x (1 + patches) for the target encoder and for fine-tuning. The machine's own limit
  for the step's dominant work;
* ``pretrain``: the real step, ``build_training`` + ``TrainStep``, called as the loop calls it;
* ``finetune``: what a fine-tune epoch runs per optimizer step (``set_lr``,
  ``train_micro_batch``, ``optimizer.step``, ``zero_grad``) with ``build_run``'s model,
  optimizer and first batch, from a fresh encoder exported as ``pilamim pretrain`` does.
  Fine-tuning has no compile setting: ``compiled`` wraps ``run.model`` in ``torch.compile``
  here, as ``TrainStep`` compiles its forward.

Settings are precision (fp32, bf16 = CPU autocast) x eager/compiled, each with glibc's
allocator kept from returning freed memory (``keep``, what every ``pilamim`` stage does:
:mod:`pilamim.allocator`) or as glibc sets it (``default``; ``--allocator keep,default`` times
both side by side). Each step setting runs in its own process (no compile or allocator state
leaks). ``vs_matmul`` is a step's achieved GFLOP/s (model
FLOPs, no attention recompute) over the matmul's of the same precision: how far the step is
from what this CPU does with the same shapes. Usage (benchmarks/README.md explains the fields)::

    python -m benchmarks.cpu_step --out benchmarks/results/cpu-step.jsonl
    python -m benchmarks.cpu_step --settings fp32-eager,bf16-eager --parts matmul,finetune
    python -m benchmarks.cpu_step --settings bf16-eager --allocator keep,default
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `pilamim` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.cpu_step_parts.measure import RUNNERS, load  # noqa: E402
from benchmarks.throughput_parts.suite import (  # noqa: E402
    Emitter,
    environment_info,
    run_guarded,
    run_isolated,
)
from pilamim.allocator import keep_freed_memory  # noqa: E402

SETTINGS = ("fp32-eager", "fp32-compiled", "bf16-eager", "bf16-compiled")
PARTS = ("matmul", "pretrain", "finetune")
ALLOCATORS = ("keep", "default")


def run_one(s: dict[str, Any]) -> dict[str, Any]:
    """One setting in this process, on the setting's threads (``None``: torch's default)."""
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    if s.get("allocator", "keep") == "keep":
        keep_freed_memory()
    record = run_guarded(s["mode"], s, RUNNERS[s["mode"]])
    record["threads"] = torch.get_num_threads()
    if s.get("compile"):  # --no-isolate: the next setting must compile afresh
        torch._dynamo.reset()
    return record


def cpu_model() -> str | None:
    """The CPU's name (Linux), so that a results file says whose GFLOP/s these are."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), None)


def settings_of(args: argparse.Namespace, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Matmul references first (per step timed, per precision), then each step's grid."""
    steps = [p for p in ("pretrain", "finetune") if p in args.parts] or ["pretrain", "finetune"]
    precisions = dict.fromkeys(s.split("-")[0] for s in args.settings)
    grid = [dict(base, mode="matmul", step=step, precision=prec, label=f"matmul-{step}-{prec}")
            for step in steps for prec in precisions] if "matmul" in args.parts else []
    return grid + [dict(base, mode=part, precision=setting.split("-")[0], allocator=alloc,
                        label=f"{part}-{setting}" + ("" if alloc == "keep" else f"-{alloc}"),
                        compile=setting.endswith("compiled"))
                   for part in ("pretrain", "finetune") if part in args.parts
                   for setting in args.settings for alloc in args.allocator]


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or set(parts) - set(allowed):
            raise argparse.ArgumentTypeError(f"a comma list of {', '.join(allowed)}")
        return parts
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step", description=__doc__.split(
        "\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default=str(REPO_ROOT / "params"), help="params folder")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                   help="params override, repeatable (as `pilamim ... --set`)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median taken)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1: compiles)")
    p.add_argument("--settings", type=_choices(SETTINGS), default=list(SETTINGS),
                   help=f"comma list of {', '.join(SETTINGS)} (bf16: CPU autocast)")
    p.add_argument("--parts", type=_choices(PARTS), default=list(PARTS),
                   help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--allocator", type=_choices(ALLOCATORS), default=["keep"],
                   help="comma list of keep (pilamim.allocator, as the stages run) and default "
                   "(glibc's own thresholds)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's)")
    p.add_argument("--channels", type=int, default=1, help="image channels (Fashion-MNIST: 1)")
    p.add_argument("--classes", type=int, default=10, help="fine-tune classes")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each step setting in its own process")
    p.add_argument("--setting-timeout", type=float, default=900.0,
                   help="seconds per isolated setting (build, compile and timing)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--run-setting", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_setting:  # child of an isolated run: one result line, no header
        print(json.dumps(run_one(json.loads(args.run_setting)), default=str), flush=True)
        return 0
    from pilamim.config import ParamsError

    base = dict(params_dir=str(Path(args.params).resolve()), overrides=args.set,
                steps=args.steps, warmup=max(1, args.warmup), threads=args.threads,
                channels=args.channels, classes=args.classes)
    try:
        load(base)
    except ParamsError as err:
        parser.error(str(err))
    from pilamim.device import cpu_has_native_bf16

    emit, refs, failed = Emitter(args.out), {}, 0
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        emit({**environment_info(), "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
              "cpu_native_bf16": cpu_has_native_bf16()})
        for s in settings_of(args, base):
            isolate = args.isolate and s["mode"] != "matmul"  # a plain mm leaves no state
            record = (run_isolated(s, args.setting_timeout, "benchmarks.cpu_step", s)
                      if isolate else run_one(s))
            if s["mode"] == "matmul" and record["ok"]:
                refs[(s["step"], s["precision"])] = record["gflop_per_s"]
            elif record["ok"]:
                ref = refs.get((s["mode"], s["precision"]))
                record["matmul_gflop_per_s"] = ref
                record["vs_matmul"] = record["achieved_gflop_per_s"] / ref if ref else None
            failed += not record["ok"]
            emit(record)
        return 1 if failed else 0
    finally:
        emit.close()


if __name__ == "__main__":
    sys.exit(main())

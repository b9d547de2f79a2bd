"""Data at scale: every data step of the pipeline, timed on a synthetic image folder of any size.

It writes ``--images`` JPEGs (``--size`` px, RGB, quality 90) made from the bundled
Fashion-MNIST subset, each varied by a seeded crop, shift, colours and noise, on all cores; then
runs each step in a process of its own and prints ONE JSON line per step on stdout: the decode +
verify ceiling (1 process, all cores), ``pilamim fetch`` and ``pilamim prepare`` in a fresh DVC
copy of this working tree, DVC's bookkeeping (commit, entries, status, no-op repro), a per-file
loader against the project's loader, and with ``--s3`` DVC push/pull and plain boto3 copies on
a loopback SeaweedFS and the whole fetch + prepare from ``s3://``. Every line carries the
command that produced it and the machine score. A failed step makes the exit status 1.

Usage (benchmarks/README.md, "Data at scale", explains every line)::

    python -m benchmarks.data_scale --images 2000 --size 64              # about a minute
    python -m benchmarks.data_scale --images 20000 --s3 --json-out r.jsonl --keep
    python -m benchmarks.data_scale --steps decode_ceiling_1proc,loader_per_file
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `pilamim`, `benchmarks`, `tests` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.data_scale_parts.common import (  # noqa: E402
    DEPS,
    S3_STEPS,
    STEPS,
    Emitter,
    machine_score,
    with_prerequisites,
)


def _step_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}; steps: {', '.join(STEPS)}")
    return names


def _workers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200_000, help="images to make (default 200000)")
    p.add_argument("--size", type=int, default=160, help="image side in px (default 160)")
    p.add_argument("--workdir", default=None,
                   help="where the images, the project copy and logs go (default: a temp dir, "
                        "removed at the end unless --keep; a --workdir is always kept, and a "
                        "second run there reuses its images)")
    p.add_argument("--keep", action="store_true", help="keep the temp workdir")
    p.add_argument("--steps", type=_step_list, default=None,
                   help="comma list of steps (their prerequisites run too); default: all, "
                        f"the S3 ones only with --s3. Steps: {', '.join(STEPS)}")
    p.add_argument("--s3", action="store_true",
                   help="also run the S3 steps on a SeaweedFS on loopback")
    p.add_argument("--json-out", default=None, help="also append the lines to this file")
    p.add_argument("--tree", default=None, metavar="REV",
                   help="copy this commit's tree (e.g. HEAD) into the project instead of the "
                        "working tree (default), e.g. while the working tree is mid-change")
    p.add_argument("--loader-images", type=int, default=20_000,
                   help="images each loader reads (capped at 70%% of --images, about the "
                        "train split, so both loaders read the same count)")
    p.add_argument("--loader-workers", type=_workers, default=[0, 2],
                   help="comma list of DataLoader worker counts (default 0,2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-timeout", type=float, default=7200.0,
                   help="seconds before a step's process group is killed")
    p.add_argument("--machine-score", action=argparse.BooleanOptionalAction, default=True,
                   help="run ../shared/tools/machine_score.py first (~35 s on 2 cores); off: null")
    p.add_argument("--fail-step", default=None, help=argparse.SUPPRESS)  # tests: exit status
    p.add_argument("--run-step", default=None, help=argparse.SUPPRESS)  # a step's child process
    p.add_argument("--step-config", default="{}", help=argparse.SUPPRESS)
    return p


def run_child(step: str, config: dict[str, Any]) -> dict[str, Any]:
    """The in-Python steps, each run as ``--run-step`` in a process of its own."""
    from benchmarks.data_scale_parts import images, loaders, s3

    if config.get("fail"):
        raise RuntimeError(f"--fail-step: failure injected into {step} (tests the exit status)")
    if step == "make_images":
        return images.make_images(Path(config["images_dir"]), config["count"], config["size"],
                                  config["seed"])
    if step == "decode":
        files = images.list_images(Path(config["images_dir"]))
        return images.decode_ceiling(files, config["processes"])
    if step == "loader_per_file":
        return loaders.per_file(config)
    if step == "loader_shards":
        return loaders.project_loader(config)
    if step == "boto3_copy":
        return s3.copy_with_boto3(config)
    if step == "upload_source":
        return s3.upload_folder(Path(config["root"]), config["bucket"], config["prefix"],
                                config["threads"])
    raise ValueError(f"unknown child step {step!r}")


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[str], set]:
    """(steps to run in order, the ones asked for); S3 steps need --s3."""
    wanted = args.steps or [s for s in STEPS if args.s3 or s not in S3_STEPS]
    if not args.s3 and S3_STEPS & set(wanted):
        parser.error(f"steps {sorted(S3_STEPS & set(wanted))} need --s3")
    if args.images < 10:
        parser.error("--images: at least 10 (one per class)")
    return with_prerequisites(wanted), set(wanted)


def git_describe() -> str | None:
    """This checkout's commit, with ``+dirty`` when the working tree differs from it."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return f"{head}+dirty" if git("status", "--porcelain") else head or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_one(bench, name: str, base: dict[str, Any]) -> dict[str, Any]:
    """One step's line: the common keys, then the step's fields; a failure is caught here."""
    from benchmarks.data_scale_parts.steps import STEP_FUNCTIONS

    record = {"step": name, **base, "ok": True, "error": None, "skipped": None, "images": None,
              "wall_s": None, "img_per_s": None, "cpu_s": None, "img_per_cpu_s": None,
              "peak_rss_mb": None, "peak_tree_rss_mb": None,
              "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    broken = [d for d in DEPS.get(name, ()) if not bench.done.get(d, {}).get("ok")]
    if broken:
        return {**record, "ok": False, "error": f"not run: needs {broken}, which failed"}
    try:
        record.update(STEP_FUNCTIONS[name](bench))
    except Exception as err:  # one failed step must not lose the others' lines
        record.update(ok=False, error=f"{type(err).__name__}: {err}"[-4000:],
                      traceback=traceback.format_exc(limit=6)[-2000:])
    record["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # other work on the machine
    if bench.args.fail_step == name and record["ok"]:
        record.update(ok=False, error=f"--fail-step {name}: failure injected")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_step:  # a child: one result line
        import json

        from benchmarks.data_scale_parts.common import cpu_seconds

        cpu0 = cpu_seconds()
        result = run_child(args.run_step, json.loads(args.step_config))
        result.setdefault("cpu_s", cpu_seconds() - cpu0)  # steps that time parts set their own
        print(json.dumps(result, default=str))
        return 0
    steps, wanted = plan(args, parser)
    from benchmarks.data_scale_parts.steps import Bench

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pilamim-data-scale-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    score, note = machine_score() if args.machine_score else (None, "--no-machine-score")
    base = {"command": shlex.join(getattr(sys, "orig_argv", sys.argv)), "machine_score": score,
            "machine_score_note": note, "cpu_count": os.cpu_count(), "size_px": args.size,
            "images_total": args.images, "git": git_describe(), "tree": args.tree or "working",
            "workdir": str(workdir)}
    emit = Emitter(args.json_out)
    bench = Bench(args, workdir)
    failed = False
    try:
        with bench.stack:
            for name in steps:
                record = run_one(bench, name, {**base, "requested": name in wanted})
                bench.done[name] = record
                failed |= not record["ok"]
                emit(record)
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

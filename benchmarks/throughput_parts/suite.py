"""Running settings (in this process or isolated), the suites, the result lines and table."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.throughput_parts.common import DATA_DEFAULTS, REPO_ROOT, STEP_DEFAULTS, free_memory
from benchmarks.throughput_parts.data import run_data_setting
from benchmarks.throughput_parts.step import run_step_setting


def run_setting(s: dict[str, Any]) -> dict[str, Any]:
    """One setting in this process; failures become a record with ``ok: false``."""
    mode = s.get("mode", "step")
    full = {**(STEP_DEFAULTS if mode == "step" else DATA_DEFAULTS), **s}
    return run_guarded(mode, full, run_step_setting if mode == "step" else run_data_setting)


def run_guarded(kind: str, setting: dict[str, Any],
                run: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """``run(setting)``'s fields in a record of ``kind``; a failure becomes ``ok: false`` with
    its error and traceback (a failed setting must not lose the others). Other benchmarks
    (``benchmarks.cpu_step``) share it, so every result line has the same common keys."""
    record: dict[str, Any] = {"kind": kind, "setting": setting, "ok": True, "error": None}
    t0 = time.perf_counter()
    try:
        record.update(run(setting))
    except Exception as err:  # a failed setting must not lose the others
        record.update(ok=False, error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc(limit=8)[-3000:])
        free_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    record["elapsed_s"] = time.perf_counter() - t0
    return record


def run_isolated(s: dict[str, Any], timeout: float, module: str = "benchmarks.throughput",
                 defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """One setting in a fresh Python process (own CUDA context, compile caches, peak memory),
    killed with its whole process group (inductor workers too) after ``timeout`` seconds.

    The child is ``python -m <module> --run-setting <json>`` and must print its record as the
    last JSON line; ``defaults`` fill the setting of the failure record (by default the
    throughput benchmark's, by mode)."""
    cmd = [sys.executable, "-m", module, "--run-setting", json.dumps(s)]
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
    if defaults is None:
        defaults = STEP_DEFAULTS if mode == "step" else DATA_DEFAULTS
    return {"kind": mode, "setting": {**defaults, **s},
            "ok": False, "error": error or "no result line", "elapsed_s": time.perf_counter() - t0}


def gpu_suite(jpeg_dir: str, cpu_count: int | None = None) -> list[dict[str, Any]]:
    """The issue's matrix: the headline settings first, so a short budget still yields them."""
    vit_b = dict(mode="step", size="base", img_size=224, patch_size=16, batch=256,
                 precision="bf16", steps=30, warmup=5)
    pilamim = dict(vit_b, profile=True, preset="pilamim", decoder_depth=6, decoder_width=384,
                   decoder_heads=12)
    mae = dict(vit_b, preset="mae", decoder_depth=8, decoder_width=512, decoder_heads=16)
    cores = cpu_count or os.cpu_count() or 1
    data = dict(mode="data", data=jpeg_dir, batch=256, img_size=224, batches=16,
                warmup_batches=2, timeout=90)
    return [
        dict(pilamim, compile=False, timeout=150, label="pilamim-b16-bf16-eager"),
        dict(mae, compile=False, timeout=150, label="mae-b16-dec8x512-bf16-eager"),
        dict(pilamim, compile=True, timeout=330, label="pilamim-b16-bf16-compiled"),
        *[dict(data, pipeline="pil", workers=w, label=f"data-pil-{w}w")
          for w in sorted({max(1, cores - 1), max(1, cores // 2)}, reverse=True)],
        dict(data, pipeline="device", workers=4, label="data-device-4w"),
        dict(data, pipeline="device_bicubic", workers=4, label="data-device-bicubic-4w"),
        dict(mae, compile=True, timeout=300, label="mae-b16-dec8x512-bf16-compiled"),
        # End to end: loader + compiled pilamim step on the JPEG folder (what pretraining gets).
        *[dict(data, pipeline=pipe, workers=w, train=dict(pilamim, compile=True), timeout=330,
               label=f"train-{pipe}-{w}w")
          for pipe, w in (("pil", max(1, cores - 1)), ("device", 4))],
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
            dict(data, pipeline="pil", workers=1, label="data-pil-1w"),
            dict(data, pipeline="device", workers=0, label="data-device-on-cpu"),
            dict(data, pipeline="device", workers=0, train=dict(micro, preset="pilamim"),
                 label="train-device-on-cpu")]


def environment_info() -> dict[str, Any]:
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


class Emitter:
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

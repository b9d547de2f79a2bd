"""Step names, the JSON lines, the machine score, and timing one step as a child process.

Every step runs in a process of its own (a ``pilamim`` / ``dvc`` command, or this benchmark
started again with ``--run-step``), so its peak memory is its own and nothing it loads or
caches (torch, page-cache-warm Python objects, DataLoader workers) leaks into the next step.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
MACHINE_SCORE = REPO_ROOT.parent / "shared/tools/machine_score.py"  # ../shared from the repo

# Run order; a step's prerequisites (DEPS) run first even when not asked for.
STEPS = ("make_images", "decode_ceiling_1proc", "decode_ceiling_all_cores", "fetch", "prepare",
         "dvc_commit", "dvc_entries", "dvc_status", "dvc_noop_repro", "loader_per_file",
         "loader_shards", "dvc_push", "dvc_pull", "boto3_copy", "prepare_s3",
         "loader_shards_s3_cold")
S3_STEPS = frozenset({"dvc_push", "dvc_pull", "boto3_copy", "prepare_s3",
                      "loader_shards_s3_cold"})
DEPS: dict[str, tuple[str, ...]] = {
    "decode_ceiling_1proc": ("make_images",), "decode_ceiling_all_cores": ("make_images",),
    "fetch": ("make_images",), "prepare": ("fetch",), "dvc_commit": ("prepare",),
    "dvc_entries": ("dvc_commit",), "dvc_status": ("dvc_commit",),
    "dvc_noop_repro": ("dvc_commit",), "loader_per_file": ("make_images",),
    "loader_shards": ("prepare",), "dvc_push": ("dvc_commit",), "dvc_pull": ("dvc_push",),
    "boto3_copy": ("dvc_commit",), "prepare_s3": ("make_images",),
    "loader_shards_s3_cold": ("prepare_s3",),
}
# Every line has these keys (null where they do not apply); steps add their own.
LINE_KEYS = ("step", "ok", "error", "skipped", "requested", "command", "machine_score",
             "images", "wall_s", "img_per_s", "cpu_s", "img_per_cpu_s", "peak_rss_mb",
             "peak_tree_rss_mb")


def with_prerequisites(wanted: list[str]) -> list[str]:
    """``wanted`` plus everything it needs, in run order."""
    need: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend(DEPS.get(name, ()))
    return [s for s in STEPS if s in need]


def machine_score(python: str = sys.executable) -> tuple[float | None, str | None]:
    """(score, note) from ``../shared/tools/machine_score.py``; None with a note when the tool
    is absent or fails, so a run elsewhere still reports its timings."""
    if not MACHINE_SCORE.is_file():
        return None, f"{MACHINE_SCORE} not found"
    try:
        done = subprocess.run([python, str(MACHINE_SCORE), "--json"], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, "machine_score.py took over 600 s"
    try:
        return float(json.loads(done.stdout.strip().splitlines()[-1])["machine_score"]), None
    except (ValueError, KeyError, IndexError):
        return None, f"machine_score.py failed: {done.stderr.strip()[-300:]}"


class Emitter:
    """Prints each line (and appends it to ``--json-out``), flushed: a killed run keeps its
    finished steps."""

    def __init__(self, out: str | None) -> None:
        self.path = Path(out) if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")


@dataclass
class Measured:
    """A finished child: exit code, output, wall time and memory."""

    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float  # largest single process of the tree (wait4's ru_maxrss)
    peak_tree_rss_mb: float | None  # sampled sum over the tree (shared pages counted twice)
    cpu_s: float  # user + system seconds of the child and the workers it waited for
    timed_out: bool = False

    @property
    def command(self) -> str:
        return shlex.join(self.cmd)

    def failure(self) -> str | None:
        """None when it exited 0; else a message with the end of its output."""
        if self.returncode == 0 and not self.timed_out:
            return None
        why = "timed out (killed)" if self.timed_out else f"exit status {self.returncode}"
        tail = (self.stderr.strip() or self.stdout.strip())[-1500:]
        return f"`{self.command}` {why}: {tail}"

    def result_line(self) -> dict[str, Any]:
        """The JSON line a ``--run-step`` child printed last."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(self.failure() or f"`{self.command}` printed no result line")
        return json.loads(lines[-1])


class _TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and its descendants (psutil, when installed)."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self.stop = threading.Event()
        try:
            import psutil
            self.psutil = psutil
        except ImportError:
            self.psutil = None

    def run(self) -> None:
        if self.psutil is None:
            return
        try:
            root = self.psutil.Process(self.pid)
        except self.psutil.Error:
            return
        while not self.stop.is_set():
            total = 0
            for proc in [root, *self._children(root)]:
                try:
                    total += proc.memory_info().rss
                except self.psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.every_s)

    def _children(self, root) -> list:
        try:
            return root.children(recursive=True)
        except self.psutil.Error:
            return []


def measure(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float,
            log_dir: Path, name: str) -> Measured:
    """Run ``cmd`` to the end; wall time, exit status and peak memory from ``os.wait4`` (the
    child's own rusage, including the workers it waited for) plus a sampled tree sum. Output
    goes to ``log_dir/name.{out,err}`` (kept for reading after a failure). After
    ``timeout_s`` the child's whole process group is killed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        sampler.stop.set()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    sampler.join(1.0)
    return Measured(cmd, proc.returncode, out_path.read_text(errors="replace"),
                    err_path.read_text(errors="replace"), wall, usage.ru_maxrss / 1024,
                    sampler.peak / 2**20 if sampler.peak else None,
                    usage.ru_utime + usage.ru_stime, killed.is_set())


def cpu_seconds() -> float:
    """User + system seconds of this process and of every child it has waited for: a rate per
    CPU second moves far less than wall time when other work shares the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child_command(step: str, config: dict[str, Any]) -> list[str]:
    """This benchmark, started again to run one in-Python step (see ``--run-step``)."""
    return [sys.executable, "-m", "benchmarks.data_scale", "--run-step", step,
            "--step-config", json.dumps(config)]

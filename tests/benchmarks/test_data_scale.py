"""``python -m benchmarks.data_scale`` end to end at a tiny size (no S3): a line per step with
the common keys, the real pipeline behind it, and a failed step fails the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.data_scale_parts.common import LINE_KEYS, S3_STEPS, STEPS, with_prerequisites
from benchmarks.data_scale_parts.project import set_param

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_STEPS = [s for s in STEPS if s not in S3_STEPS]
TINY = ["--images", "300", "--size", "32", "--loader-images", "64", "--no-machine-score"]


def _run(tmp_path: Path, *args: str) -> tuple[int, list[dict], str]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_scale", *TINY, *args],
                          cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, lines, proc.stderr[-3000:]


def test_every_local_step_prints_one_line(tmp_path):
    out = tmp_path / "lines.jsonl"
    rc, lines, err = _run(tmp_path, "--workdir", str(tmp_path / "work"), "--json-out", str(out))
    assert [r["step"] for r in lines] == LOCAL_STEPS, err
    failed = {r["step"]: r["error"] for r in lines if not r["ok"]}
    assert rc == 0 and not failed, failed
    for r in lines:
        assert set(LINE_KEYS) <= set(r), set(LINE_KEYS) - set(r)
        assert "benchmarks.data_scale" in r["command"] and "--images 300" in r["command"]
        assert r["machine_score"] is None and r["requested"] and r["skipped"] is None
    by = {r["step"]: r for r in lines}
    for step in ("make_images", "decode_ceiling_1proc", "decode_ceiling_all_cores", "fetch",
                 "prepare", "dvc_commit", "loader_per_file", "loader_shards"):
        assert by[step]["img_per_s"] > 0 and by[step]["img_per_cpu_s"] > 0, by[step]
        assert by[step]["peak_rss_mb"] > 0, by[step]
    assert by["make_images"]["images"] == 300
    assert by["decode_ceiling_1proc"]["images"] == 300
    assert by["dvc_entries"]["entries"] > 0 and by["dvc_entries"]["entries_per_1000_images"] > 0
    assert by["dvc_status"]["wall_s"] > 0 and by["dvc_noop_repro"]["wall_s"] > 0
    # both loaders read the same count, at each worker count asked for
    for step in ("loader_per_file", "loader_shards"):
        assert [run["workers"] for run in by[step]["runs"]] == [0, 2]
        assert by[step]["images"] == 64
    assert by["loader_shards"]["pilamim_from"] == str(tmp_path / "work" / "project" / "pilamim")
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines


def test_a_failed_step_fails_the_command(tmp_path):
    """The failure is injected into make_images' child process; the step that needs it is
    reported as not run, and the exit status is 1."""
    rc, lines, err = _run(tmp_path, "--steps", "decode_ceiling_1proc",
                          "--fail-step", "make_images")
    assert rc == 1, err
    assert [r["step"] for r in lines] == ["make_images", "decode_ceiling_1proc"]
    made, decoded = lines
    assert not made["ok"] and "injected" in made["error"] and not made["requested"]
    assert not decoded["ok"] and "make_images" in decoded["error"]


def test_unknown_step_and_s3_without_flag_are_usage_errors(tmp_path):
    for args in (["--steps", "nonsense"], ["--steps", "dvc_push"]):
        rc, lines, err = _run(tmp_path, *args)
        assert rc == 2 and not lines and "usage" in err


def test_prerequisites_run_first():
    assert with_prerequisites(["dvc_pull"]) == ["make_images", "fetch", "prepare",
                                                "dvc_commit", "dvc_push", "dvc_pull"]
    assert with_prerequisites(["decode_ceiling_all_cores"]) == ["make_images",
                                                                "decode_ceiling_all_cores"]


def test_set_param_keeps_comments(tmp_path):
    (tmp_path / "params").mkdir()
    path = tmp_path / "params" / "data.yaml"
    path.write_text("source: embedded   # where from\nsource_x: 1\nraw_dir: data/raw\n")
    set_param(tmp_path, "data", "source", "/x/images")
    set_param(tmp_path, "data", "raw_dir", "r")
    assert path.read_text() == "source: /x/images  # where from\nsource_x: 1\nraw_dir: r\n"

"""The budget curve: several fidelity studies in one pool, the curve report, its reading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.fidelity_study import curve

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_curve_runs_every_budget_in_one_pool_and_a_rerun_reuses_them(tmp_path, capsys):
    from benchmarks.budget_curve import main

    out, work = tmp_path / "reports", tmp_path / "work"
    args = ["--budget", "micro", "--multipliers", "1", "2", "--entries", "pilamim",
            "--seeds", "0", "--out", str(out), "--work-dir", str(work), "--jobs", "2",
            "--threads", "1", "--no-track"]
    assert main(args) == 0

    x1 = json.loads((out / "fidelity_runs" / "pilamim-seed0.json").read_text())
    x2 = json.loads((out / "budget_x2" / "fidelity_runs" / "pilamim-seed0.json").read_text())
    assert x2["pretrain"]["steps"] == 2 * x1["pretrain"]["steps"]
    assert x2["fingerprint"] != x1["fingerprint"]
    # fine-tuning only at x1; the floors only at x1, where every study reads them
    assert x1["metrics"]["finetune_top1"] is not None and x2["metrics"]["finetune_top1"] is None
    assert {p.name for p in (out / "fidelity_runs").iterdir()} == {
        "pilamim-seed0.json", "random_init-seed0.json", "raw_pixels-seed0.json"}
    assert [p.name for p in (out / "budget_x2" / "fidelity_runs").iterdir()] == [
        "pilamim-seed0.json"]
    assert x2["timing"]["pretrain_cpu_s"] > 0

    md = (out / "budget_curve.md").read_text()
    assert "python -m benchmarks.budget_curve " + " ".join(args) in md
    steps = {row["multiplier"]: row["steps"]
             for row in json.loads((out / "budget_curve.json").read_text())["points"]}
    assert steps == {1: x1["pretrain"]["steps"], 2: x2["pretrain"]["steps"]}
    assert f"| x2 | {x2['pretrain']['steps']} | PiLaMIM |" in md
    assert "| any | 0 | raw-pixel floor |" in md
    assert (out / "budget_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "budget_x2" / "fidelity.md").exists() and (out / "fidelity.md").exists()

    # a rerun computes nothing: every run is read back from its results JSON
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") == 4 and " s)" not in printed
    again = json.loads((out / "budget_x2" / "fidelity_runs" / "pilamim-seed0.json").read_text())
    assert again == x2


def _result(entry: str, k: int, seed: int, probe: float, knn: float = 0.5) -> dict:
    return {"entry": entry, "seed": seed, "pretrain": {"steps": 960 * k},
            "timing": {"pretrain_cpu_s": 60.0 if k == 1 else 1.0},  # x2: resumed, say
            "metrics": {"probe_top1": probe, "knn_top1": knn, "lowlevel_top1": 0.3,
                        "lowlevel_knn_top1": 0.3}}


def _seeds(entry: str, k: int, probes: tuple[float, ...]) -> list[dict]:
    """One result per seed, seed i with probe top-1 ``probes[i]``."""
    return [_result(entry, k, s, p) for s, p in enumerate(probes)]


def test_reading_says_where_a_preset_overtakes_and_where_the_probe_crosses_raw_pixels():
    results = {
        1: _seeds("pilamim", 1, (0.79, 0.80, 0.81))
        + _seeds("mae", 1, (0.81, 0.82, 0.83))
        + _seeds("raw_pixels", 1, (0.849, 0.850, 0.851)),
        2: _seeds("pilamim", 2, (0.86, 0.87, 0.88))
        + _seeds("mae", 2, (0.83, 0.84, 0.85)),
    }
    pts = curve.points(results, ["pilamim", "mae"])
    floor = curve.floors(results[1])
    assert [(p.entry, p.multiplier, p.steps) for p in pts] == [
        ("pilamim", 1, 960), ("mae", 1, 960), ("pilamim", 2, 1920), ("mae", 2, 1920)]
    # cost = steps x the preset's CPU-seconds per step at x1 (60 s / 960 steps here)
    assert pts[2].cpu_minutes == pytest.approx(2.0)
    text = "\n".join(curve.reading(pts, floor))
    assert "x1 (960 steps): PiLaMIM vs MAE (pixel) on linear probe top-1: -2.00" in text
    assert "x2 (1920 steps): PiLaMIM vs MAE (pixel) on linear probe top-1: +3.00" in text
    assert text.count("**loses**") == 1 and text.count("**wins**") == 1
    assert "PiLaMIM's probe beats raw pixels beyond the seed spread from x2 (1920 steps)" in text
    assert "MAE (pixel)'s probe stays below raw pixels at every budget run (closest: x2, " \
           "1.00 points below)" in text


def test_reading_tables_the_ablations_against_mae_and_pilamim_at_every_budget():
    results = {
        1: _seeds("pilamim", 1, (0.79, 0.80, 0.81))
        + _seeds("mae", 1, (0.81, 0.82, 0.83))
        + _seeds("pilamim_nocls", 1, (0.835, 0.845, 0.855)),
        2: _seeds("mae", 2, (0.83, 0.84, 0.85))
        + [_result("pilamim_nocls", 2, 0, 0.86)],
    }
    pts = curve.points(results, ["pilamim", "mae", "pilamim_nocls"])
    text = "\n".join(curve.reading(pts, curve.floors(results[1])))
    assert "| pair | metric | x1 | x2 |" in text
    # x1: +2.50 over a pooled spread of 1.00; x2: one seed of no-[CLS], no verdict
    assert ("| PiLaMIM w/o [CLS] vs MAE (pixel) | linear probe top-1 | +2.50 (2.5×) wins | "
            "+2.00 (one seed) |") in text
    assert ("| PiLaMIM w/o [CLS] vs PiLaMIM | linear probe top-1 | +4.50 (4.5×) wins | — |"
            in text)
    # equal kNN with no spread on either side: level, not an infinitely large ratio
    assert "| PiLaMIM w/o [CLS] vs MAE (pixel) | kNN top-1 | +0.00 (no spread) within noise" \
        in text
    assert "latent" not in text  # a preset that was not run gets no row


def test_x1_is_the_fidelity_study_folder_and_longer_budgets_sit_beside_it():
    root = Path("reports")
    assert curve.study_dir(root, 1) == root
    assert curve.study_dir(root, 8) == root / "budget_x8"


@pytest.mark.slow
def test_suspects_run_beside_the_default_and_are_read_on_val(tmp_path):
    from benchmarks.suspects import main

    out = tmp_path / "reports"
    args = ["--budget", "micro", "--only", "decoder_128", "--with-default", "--seeds", "0",
            "--out", str(out), "--work-dir", str(tmp_path / "work"), "--jobs", "1",
            "--threads", "1", "--no-track"]
    assert main(args) == 0
    assert sorted(p.name for p in (out / "fidelity_runs").iterdir()) == [
        "mae-seed0.json", "pilamim-seed0.json"]
    wide = sorted(p.name for p in (out / "suspects" / "decoder_128" / "fidelity_runs").iterdir())
    assert wide == ["mae-seed0.json", "pilamim-seed0.json"]  # it changes both presets
    suspect = json.loads((out / "suspects" / "decoder_128" / "fidelity_runs"
                          / "pilamim-seed0.json").read_text())
    default = json.loads((out / "fidelity_runs" / "pilamim-seed0.json").read_text())
    assert suspect["fingerprint"] != default["fingerprint"]
    # the default's runs are the x1 study's, fine-tuned as that study does; suspects are not
    assert default["metrics"]["finetune_top1"] is not None
    assert suspect["metrics"]["finetune_top1"] is None

    md = (out / "suspects.md").read_text()
    assert "| decoder_128 | `model.decoder_width=128` | PiLaMIM |" in md
    assert "| default | (embedded default) | MAE (pixel) |" in md
    assert "- Best suspect for PiLaMIM on val linear probe top-1: **" in md
    assert "- Best suspect for PiLaMIM on val kNN top-1: **" in md
    assert "PiLaMIM with it vs without on linear probe top-1" in md

    # another suspect later: the report keeps the first one's rows
    assert main([*args[:2], "--only", "cls_weight_half", *args[5:]]) == 0
    md = (out / "suspects.md").read_text()
    assert "| cls_weight_half | `model.cls_weight=0.5` | PiLaMIM |" in md
    assert "| decoder_128 | `model.decoder_width=128` | MAE (pixel) |" in md


_POOL = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from benchmarks.fidelity_study import parallel

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=parallel._init,
                             initargs=(1,)) as pool:
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 120).result()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_study_takes_its_workers_with_it(tmp_path):
    """Else a worker goes on training a run that the restarted study trains again."""
    script = tmp_path / "pool.py"
    script.write_text(_POOL)
    study = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        worker = int(study.stdout.readline())
        assert _alive(worker)
        study.send_signal(signal.SIGKILL)
        study.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        study.kill()

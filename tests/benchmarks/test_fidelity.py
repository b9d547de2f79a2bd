"""The fidelity study: the micro budget end to end (CLI, MLflow, report), plus its pure parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.fidelity_study import runs, stats
from benchmarks.fidelity_study.budgets import BUDGETS, budget_params, with_paths
from benchmarks.fidelity_study.lowlevel import NUM_BINS, assign_bins, within_class_edges
from pilamim.config import ADDED_NEUTRAL

REPO = Path(__file__).resolve().parents[2]


def _table_rows(md: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_micro_study_end_to_end_report_tracking_and_resume(tmp_path, capsys):
    out, work = tmp_path / "reports", tmp_path / "work"
    args = ["--budget", "micro", "--seeds", "0", "--out", str(out), "--work-dir", str(work)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PILAMIM_EXPERIMENT": "fidelity-test"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    md = (out / "fidelity.md").read_text()
    assert "python -m benchmarks.fidelity " + " ".join(args) in md
    # the params it shows name no folder of the machine that ran it (only the command does)
    for text in (md, (out / "fidelity.json").read_text()):
        assert f"{work}/data" not in text and f"{work}/runs" not in text
    assert "<work-dir>/data/prepared" in md
    header = ["entry", "seeds", *stats.METRICS.values()]
    summary = _table_rows(md, "| entry | seeds |")
    assert summary[0] == header
    assert [r[0] for r in summary[2:]] == [stats.LABELS[e] for e in runs.ENTRIES]
    every = _table_rows(md, "| entry | seed |")
    assert len(every) - 2 == len(runs.ENTRIES)  # header + separator + one row per run
    for heading in ("## Honest reading", "## The low-level task", "## Params", "## Budget"):
        assert heading in md
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((out / "fidelity.json").read_text())
    assert len(data["runs"]) == len(runs.ENTRIES)
    for run in data["runs"]:
        assert set(run["metrics"]) == set(stats.METRICS)
        assert 0.0 <= run["metrics"]["probe_top1"] <= 1.0
        assert run["timing"]["total_s"] > 0
    tuned = {r["entry"] for r in data["runs"] if r["metrics"]["finetune_top1"] is not None}
    assert tuned == set(runs.FINETUNED)  # raw pixels have no encoder; presets skip it

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("fidelity-test")
    found = client.search_runs([experiment.experiment_id])
    parent = next(r for r in found if r.info.run_name == "fidelity-study")
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(f"{e}-seed0" for e in runs.ENTRIES)
    assert all("fidelity/probe_top1" in r.data.metrics for r in children)
    assert "pilamim/probe_top1_mean" in parent.data.metrics

    # Resume: every results JSON exists, so nothing is recomputed.
    from benchmarks.fidelity import main

    stamps = {p: p.stat().st_mtime_ns for p in (out / runs.RUNS_DIR).glob("*.json")}
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--no-track"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("(reused)") == len(runs.ENTRIES)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / runs.RUNS_DIR).glob("*.json")}
    assert _table_rows((out / "fidelity.md").read_text(), "| entry | seed |")[2][-1] == "yes"


def test_comparisons_count_only_differences_beyond_the_seed_spread():
    a = stats.summarize([0.80, 0.82, 0.81])
    near = stats.summarize([0.805, 0.815, 0.79])
    far = stats.summarize([0.70, 0.71, 0.72])
    assert stats.compare(a, near, "probe_top1", "pilamim", "mae").verdict == "within noise"
    win = stats.compare(a, far, "probe_top1", "pilamim", "mae")
    assert win.verdict == "wins" and win.diff == pytest.approx(0.10) and win.ratio > 1
    assert stats.compare(far, a, "probe_top1", "mae", "pilamim").verdict == "loses"
    one = stats.compare(stats.summarize([0.9]), far, "probe_top1", "pilamim", "mae")
    assert one.verdict == "single seed" and one.spread is None


def test_targets_are_judged_beyond_spread_and_margin_and_missing_entries_are_undecided():
    def run(entry, seed, top1, finetune=None):
        return {"entry": entry, "seed": seed,
                "metrics": {"probe_top1": top1, "finetune_top1": finetune}}

    results = [run("pilamim", s, 0.80 + 0.01 * s, 0.88 + 0.001 * s) for s in range(3)]
    results += [run("mae", s, 0.70 + 0.01 * s) for s in range(3)]
    results += [run("random_init", s, 0.75 + 0.01 * s, 0.86 + 0.001 * s) for s in range(3)]
    goals = {(g["a"], g["b"], g["metric"]): g for g in stats.targets(stats.table(results))}
    assert goals[("pilamim", "mae", "probe_top1")]["met"] is True
    # 5 points beyond the spread, but the target asks for 8
    probe_gain = goals[("pilamim", "random_init", "probe_top1")]
    assert probe_gain["verdict"] == "wins" and probe_gain["met"] is False
    assert "8 points" in probe_gain["text"]
    assert goals[("pilamim", "random_init", "finetune_top1")]["met"] is True
    assert goals[("pilamim", "latent", "probe_top1")]["met"] is None  # not run


def test_low_level_bins_are_balanced_within_each_class_and_class_tells_nothing():
    gen = torch.Generator().manual_seed(0)
    classes = torch.arange(4).repeat_interleave(80)
    values = torch.rand(320, generator=gen) + classes * 0.5  # brightness differs by class
    edges = within_class_edges(values, classes, 4)
    bins = assign_bins(values, classes, edges)
    for c in range(4):
        counts = torch.bincount(bins[classes == c], minlength=NUM_BINS)
        assert counts.tolist() == [10] * NUM_BINS


def test_budgets_share_everything_but_preset_seed_and_folders(tmp_path):
    for budget in BUDGETS:
        params = budget_params(budget)
        a = with_paths(params, tmp_path, "pilamim-seed0", "pilamim", 0)
        b = with_paths(params, tmp_path, "mae-seed2", "mae", 2)
        assert runs.fingerprint(a) == runs.fingerprint(b)
        assert a.pretrain.out_dir != b.pretrain.out_dir and b.probe.seed == 2
        assert a.pretrain.epochs == b.pretrain.epochs and a.model.size == b.model.size
    changed = budget_params("micro", overrides=["model.norm_pix_loss=true"])
    assert changed.model.norm_pix_loss
    assert runs.fingerprint(changed) != runs.fingerprint(budget_params("micro"))


def test_an_option_at_its_neutral_value_keeps_the_fingerprint_and_any_other_value_changes_it():
    params = budget_params("micro")
    dumped = runs.fingerprint(params)
    for key, neutral in ADDED_NEUTRAL["model"].items():
        assert getattr(params.model, key) == neutral
        other = 0.5 if isinstance(neutral, float) else "layer_norm"
        changed = params.model_copy(update={"model": params.model.model_copy(
            update={key: other})})
        assert runs.fingerprint(changed) != dumped


def test_results_of_other_study_params_are_refused_not_mixed(tmp_path):
    path = runs.result_path(tmp_path, "mae", 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"entry": "mae", "seed": 1, "fingerprint": "other"}))
    todo = [(1, "mae"), (1, "latent")]
    assert runs.mismatched(tmp_path, todo, "mine") == [path]
    assert runs.mismatched(tmp_path, todo, "other") == []
    kept, ignored = runs.load_results(tmp_path, "mine")
    assert kept == [] and ignored == [path]


def test_run_order_covers_every_entry_once_and_fine_tunes_the_pair_the_target_needs():
    assert sorted(runs.RUN_ORDER) == sorted(runs.ENTRIES)
    assert set(runs.FINETUNED) == {"pilamim", "random_init"}

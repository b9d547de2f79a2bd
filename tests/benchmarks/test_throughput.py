"""The throughput benchmark runs end to end on the CPU: step mode, data mode, compile, suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import throughput as bench

REPO_ROOT = Path(__file__).resolve().parents[2]
MICRO = ["--size", "micro", "--img-size", "16", "--patch-size", "4", "--batch", "4",
         "--steps", "2", "--warmup", "1", "--precision", "fp32", "--no-compile",
         "--decoder-depth", "1", "--decoder-width", "16", "--decoder-heads", "2",
         "--device", "cpu"]
STEP_KEYS = {"kind", "setting", "ok", "error", "images_per_s", "step_ms_median", "step_ms_mean",
             "flops_per_image", "flops_analytic_per_image", "flops_analytic_sdpa_per_image",
             "achieved_tflops", "mfu", "peak_mem_gib", "loss", "loss_ref_fp32", "loss_match",
             "loss_match_ok", "first_step_s", "host_syncs_per_step", "loss_finite",
             "precision_resolved", "elapsed_s"}


def _run(*args: str, timeout: float = 600) -> tuple[int, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr[-3000:]
    return proc.returncode, lines


def test_analytic_flops_match_the_issue():
    """ViT-B/16 at 224: PiLaMIM 89.46 GFLOP per image (fwd + bwd), MAE (decoder 8x512) 58.46,
    with every patch embedded (timm's conv); embedding only the visible ones saves 0.35."""
    pilamim = bench.analytic_flops("base", "pilamim", 224, 16, 6, 384, patch_matmul=False)
    assert pilamim["total"] / 1e9 == pytest.approx(89.46, abs=0.01)
    assert pilamim["target_forward"] / 1e9 == pytest.approx(35.13, abs=0.01)
    fast = bench.analytic_flops("base", "pilamim", 224, 16, 6, 384)
    assert (pilamim["total"] - fast["total"]) / 1e9 == pytest.approx(0.35, abs=0.01)
    mae = bench.analytic_flops("base", "mae", 224, 16, 8, 512, patch_matmul=False)
    assert mae["total"] / 1e9 == pytest.approx(58.46, abs=0.01)
    assert "target_forward" not in mae and "latent_decoder" not in mae


def test_step_mode_micro(tmp_path):
    out = tmp_path / "r.jsonl"
    settings = json.dumps([{"preset": "pilamim"}, {"preset": "mae"}])
    rc, lines = _run(*MICRO, "--settings", settings, "--out", str(out))
    assert rc == 0, lines
    header, *results = lines
    assert header["kind"] == "header" and "benchmarks.throughput" in header["command"]
    assert "--size micro" in header["command"]
    assert [r["setting"]["preset"] for r in results] == ["pilamim", "mae"]
    for r in results:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert r["ok"] and r["error"] is None
        assert r["images_per_s"] > 0 and r["step_ms_median"] > 0
        assert r["flops_per_image"] > 0
        # the flop counter's figure is the analytic one (with fused attention's recompute)
        assert r["flops_per_image"] == pytest.approx(r["flops_analytic_sdpa_per_image"],
                                                     rel=1e-9)
        assert r["loss_match"] < 1e-5 and r["loss_match_ok"]
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU
        assert r["host_syncs_per_step"] is None and r["loss_finite"]
        assert r["precision_resolved"] == "fp32"
    assert results[0]["flops_target_forward_per_image"] > 0
    assert results[1]["flops_target_forward_per_image"] is None  # mae builds no target
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    table = bench.summarize(out).splitlines()
    assert len(table) == 3 and table[1].split()[1] == "yes"


def test_data_mode_makes_jpegs_and_times_pipelines(tmp_path):
    jpegs = tmp_path / "jpegs"
    rc, lines = _run("--make-jpegs", "8", str(jpegs), "--data", str(jpegs),
                     "--pipeline", "pil,device", "--workers", "1", "--batch", "4", "--img-size",
                     "32", "--data-batches", "2", "--data-warmup", "1", "--device", "cpu")
    assert rc == 0, lines
    made = lines[1]
    assert made["kind"] == "make_jpegs" and made["images"] == 8
    assert 30 < made["mean_kb"] < 120  # ImageNet-like file sizes
    assert len(list(jpegs.glob("*/*.JPEG"))) == 8
    data = lines[2:]
    assert [d["setting"]["pipeline"] for d in data] == ["pil", "device"]
    for d in data:
        assert d["ok"], d.get("traceback")
        # warm-up and timed batches grow with the workers, so nothing in flight is timed
        assert d["warmup_batches"] >= 2 * 1 and d["timed_batches"] >= 4 * 1
        assert d["images_per_s"] > 0 and d["images"] == 4 * d["timed_batches"]
        assert d["shape"] == [4, 3, 32, 32]
        assert abs(d["batch_mean"]) < 1.5 and 0.2 < d["batch_std"] < 3


def test_budget_skips_settings(capsys):
    assert bench.main([*MICRO, "--budget-s", "0"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["kind"] for x in lines] == ["header", "skipped"]


def test_gpu_suite_settings_are_valid(capsys):
    """The GPU matrix: every step setting is valid params; --only filters it by label."""
    suite = bench.gpu_suite("/tmp/j", cpu_count=16)
    labels = [s["label"] for s in suite]
    assert labels[:3] == ["pilamim-b16-bf16-eager", "mae-b16-dec8x512-bf16-eager",
                          "pilamim-b16-bf16-compiled"]  # the headline settings first
    assert "data-pil-15w" in labels and "data-device-4w" in labels
    assert labels[-3:] == ["mae-b16-dec8x512-bf16-compiled", "train-pil-15w",
                           "train-device-4w"]
    for s in suite:
        step = s if s["mode"] == "step" else s.get("train")
        if step:
            params = bench.step_params({**bench.STEP_DEFAULTS, **step})
            assert params.model.size == "base" and params.pretrain.batch_size == 256
    assert bench.main(["--suite", "gpu", "--only", "compiled", "--list"]) == 0
    listed = [json.loads(x)["setting"] for x in capsys.readouterr().out.splitlines()]
    assert [s["compile"] for s in listed] == [True, True]


@pytest.mark.slow
def test_compiled_step_runs_on_cpu():
    """torch.compile of the real step (inductor, C++ on CPU); the loss equals eager fp32."""
    s = dict(size="micro", img_size=16, patch_size=4, batch=4, steps=2, warmup=2,
             precision="fp32", compile=True, decoder_depth=1, decoder_width=16,
             decoder_heads=2, device="cpu")
    r = bench.run_setting(s)
    assert r["ok"], r.get("traceback")
    assert r["loss_match"] < 1e-4 and r["loss_finite"] and r["images_per_s"] > 0


@pytest.mark.slow
def test_smoke_suite_isolated(tmp_path):
    """The --suite machinery the GPU run uses: each setting in its own process, all succeed."""
    rc, lines = _run("--suite", "smoke", "--jpeg-dir", str(tmp_path / "j"), "--jpeg-count",
                     "8", "--budget-s", "500")
    assert rc == 0, [x.get("error") for x in lines]
    kinds = [x["kind"] for x in lines]
    assert kinds == ["header", "make_jpegs", "step", "step", "data", "data", "data"]
    assert all(x["ok"] for x in lines[2:])
    trained = lines[-1]  # loader + the real training step, end to end
    assert trained["setting"]["label"] == "train-device-on-cpu" and trained["loss_finite"]
    assert trained["images"] == trained["timed_batches"] * 4 and trained["images_per_s"] > 0

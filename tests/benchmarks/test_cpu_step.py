"""The CPU step benchmark runs end to end on a micro model: matmul reference, pretrain and
fine-tune steps in their own processes, and FLOPs that agree with the flop counter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import cpu_step as bench
from benchmarks.cpu_step_parts.measure import finetune_flops_per_image, load
from benchmarks.throughput_parts.flops import flop_counter

REPO_ROOT = Path(__file__).resolve().parents[2]
SETS = ["model.size=micro", "model.img_size=16", "model.patch_size=4", "model.depth=2",
        "model.decoder_width=16", "pretrain.batch_size=8", "finetune.batch_size=8"]
MICRO = [arg for s in SETS for arg in ("--set", s)] + ["--steps", "2", "--warmup", "1"]
STEP_KEYS = {"kind", "setting", "ok", "error", "elapsed_s", "threads", "build_s", "batch",
             "loss", "compile_s", "images_per_s", "step_ms_median", "step_ms_min",
             "step_ms_max", "loss_finite", "flops_per_image", "achieved_gflop_per_s",
             "matmul_gflop_per_s", "vs_matmul"}


def _run(*args: str, timeout: float = 300) -> tuple[int, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_step", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr[-3000:]
    return proc.returncode, lines


def _positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_micro_run_eager(tmp_path):
    """Header, 4 matmul references, then each step per setting, each isolated; the rates and
    ratios are consistent with one another."""
    from pilamim.train.flops import step_flops_per_image

    out = tmp_path / "r.jsonl"
    rc, lines = _run(*MICRO, "--settings", "fp32-eager,bf16-eager", "--out", str(out))
    assert rc == 0, [r.get("traceback") or r.get("error") for r in lines]
    header, *records = lines
    assert header["kind"] == "header" and "benchmarks.cpu_step" in header["command"]
    assert "--set model.size=micro" in header["command"] and header["threads"] == 1
    assert [r["setting"]["label"] for r in records] == [
        "matmul-pretrain-fp32", "matmul-pretrain-bf16", "matmul-finetune-fp32",
        "matmul-finetune-bf16", "pretrain-fp32-eager", "pretrain-bf16-eager",
        "finetune-fp32-eager", "finetune-bf16-eager"]
    assert all(r["ok"] and r["error"] is None and r["threads"] == 1 for r in records), records

    matmul = {(r["setting"]["step"], r["setting"]["precision"]): r for r in records[:4]}
    # micro: width 32; 16 patches, 4 visible; batch 8 -> 8 x 5 and 8 x 17 rows
    pre = matmul["pretrain", "fp32"]["shapes"]
    assert (pre["encoder.qkv"]["m"], pre["encoder.qkv"]["k"], pre["encoder.qkv"]["n"]) == (
        40, 32, 96)
    assert (pre["target.fc2"]["m"], pre["target.fc2"]["k"], pre["target.fc2"]["n"]) == (
        136, 128, 32)
    assert set(matmul["finetune", "bf16"]["shapes"]) == {
        "encoder.qkv", "encoder.proj", "encoder.fc1", "encoder.fc2"}
    assert matmul["finetune", "bf16"]["shapes"]["encoder.fc1"]["m"] == 136
    for r in matmul.values():
        assert _positive(r["gflop_per_s"])
        assert all(_positive(s["gflop_per_s"]) and _positive(s["ms"])
                   for s in r["shapes"].values())

    params = load({"params_dir": str(REPO_ROOT / "params"), "overrides": SETS})
    flops = {"pretrain": step_flops_per_image(params.model, 1),
             "finetune": finetune_flops_per_image(params, 1, 10)}
    for r in records[4:]:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        kind, precision = r["kind"], r["setting"]["precision"]
        assert r["batch"] == 8 and r["loss_finite"] and r["setting"]["compile"] is False
        for key in ("images_per_s", "step_ms_median", "compile_s", "achieved_gflop_per_s",
                    "vs_matmul", "loss"):
            assert _positive(r[key]), (key, r[key])
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert r["images_per_s"] == pytest.approx(8 / (r["step_ms_median"] / 1e3))
        assert r["flops_per_image"] == flops[kind]
        assert r["achieved_gflop_per_s"] == pytest.approx(
            r["flops_per_image"] * r["images_per_s"] / 1e9)
        assert r["matmul_gflop_per_s"] == matmul[kind, precision]["gflop_per_s"]
        assert r["vs_matmul"] == pytest.approx(r["achieved_gflop_per_s"]
                                               / r["matmul_gflop_per_s"])
    fp32, bf16 = records[4], records[5]
    assert fp32["loss_match"] < 1e-6 and fp32["loss_match_ok"]  # the reference itself
    assert bf16["loss_match_ok"] and bf16["loss_ref_fp32"] == fp32["loss_ref_fp32"]
    assert math.log(10) == pytest.approx(records[6]["loss"], rel=0.05)  # fresh head: ~uniform
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines


def test_finetune_flops_match_the_counter():
    """Model FLOPs of a fine-tune micro-batch = the flop counter's, less the scores that fused
    attention's backward recomputes (0.5 x 4 T^2 d per block), which model FLOPs leave out."""
    from pilamim.evaluate.finetune import build_run, train_micro_batch
    from pilamim.model.export import export_encoder
    from pilamim.model.pilamim import build_pilamim

    params = load({"params_dir": str(REPO_ROOT / "params"), "overrides": SETS})
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as encoder_dir:
        model = build_pilamim(params.model, 1)
        export_encoder(model.encoder, *model.encoder_spec(), encoder_dir)
        data = torch.utils.data.TensorDataset(torch.randn(4, 1, 16, 16),
                                              torch.randint(0, 10, (4,)))
        run = build_run(encoder_dir, data, 10, params.finetune, cpu)
    images, labels = next(iter(run.loader))
    with flop_counter() as counter:
        train_micro_batch(run, images, labels, cpu, None)
    tokens, width, depth = 1 + 16, 32, 2
    recompute = 2 * tokens**2 * width * depth
    counted = counter.get_total_flops() / images.shape[0]
    assert finetune_flops_per_image(params, 1, 10) + recompute == counted


def test_usage_errors_and_no_matmul(capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--settings", "fp16-eager"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        bench.main(["--set", "model.size=huge"])
    assert err.value.code == 2 and "model.size" in capsys.readouterr().err
    # In this process (--no-isolate), without matmul references: vs_matmul is null.
    rc = bench.main([*MICRO, "--parts", "finetune", "--settings", "fp32-eager", "--no-isolate"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [r["kind"] for r in lines] == ["header", "finetune"]
    assert lines[1]["ok"] and lines[1]["vs_matmul"] is None
    assert lines[1]["matmul_gflop_per_s"] is None

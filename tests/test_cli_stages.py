"""The library stages through the real CLI, as a user runs them, on tiny settings."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from pilamim.config import Params
from pilamim.params_files import dump_params


def _pilamim(cwd, *args, env=None):
    return subprocess.run([sys.executable, "-m", "pilamim.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=env)


def _tiny_params(tmp_path):
    """Default relative paths (the output contract) with micro model and short schedules."""
    params = Params()
    params.data.max_images_per_class = 30
    params.model = params.model.model_copy(update=dict(
        size="micro", depth=None, img_size=16, decoder_depth=1, decoder_width=16,
        decoder_heads=2))
    params.pretrain.epochs, params.pretrain.batch_size, params.pretrain.lr = 3, 16, 1e-3
    # LARS moves weights ~lr*1e-3 relatively per step: few samples need a larger lr
    params.probe.warmup_epochs, params.probe.epochs = 3, 40
    params.probe.batch_size, params.probe.base_lr = 16, 100.0
    params.finetune.warmup_epochs, params.finetune.epochs, params.finetune.batch_size = 0, 1, 32
    dump_params(params, tmp_path / "params")
    return params


@pytest.mark.slow  # seven CLI processes
def test_stage_before_its_inputs_names_the_stage_to_run_first(tmp_path):
    _tiny_params(tmp_path)
    done = _pilamim(tmp_path, "probe")
    assert done.returncode == 1 and "pilamim prepare" in done.stderr
    assert "Traceback" not in done.stderr
    done = _pilamim(tmp_path, "prepare")
    assert done.returncode == 1 and "pilamim fetch" in done.stderr, done.stderr
    assert _pilamim(tmp_path, "fetch").returncode == 0
    assert _pilamim(tmp_path, "prepare").returncode == 0
    for stage in ("probe", "finetune"):
        done = _pilamim(tmp_path, stage)
        assert done.returncode == 1 and "pilamim pretrain" in done.stderr, done.stderr


@pytest.mark.slow
def test_prepare_pretrain_probe_finetune_through_the_cli(tmp_path):
    _tiny_params(tmp_path)
    for stage in ("fetch", "prepare", "pretrain", "probe", "finetune"):
        done = _pilamim(tmp_path, stage)
        assert done.returncode == 0, f"{stage}: {done.stderr[-2000:]}"
    manifest = (tmp_path / "data/prepared/manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,label,split,sha256" and len(manifest) == 301
    assert (tmp_path / "models/pretrain/checkpoint.pt").exists()
    spec = json.loads((tmp_path / "models/pretrain/encoder.json").read_text())
    assert spec["in_chans"] == 1 and spec["img_size"] == 16
    probe = json.loads((tmp_path / "metrics/probe.json").read_text())
    finetune = json.loads((tmp_path / "metrics/finetune.json").read_text())
    for metrics in (probe, finetune):
        assert 0.0 <= metrics["top5"] <= 1.0 and metrics["top1"] <= metrics["top5"]
    # 10 classes: chance is 0.1; even a 3-epoch micro encoder separates Fashion-MNIST well
    assert probe["top1"] >= 0.35, probe["top1"]
    assert "knn_top1" in probe
    assert (tmp_path / "models/probe/confusion_matrix.png").exists()

    # The numbers say what they measured; an encoder from other data or channels is refused.
    digest = json.loads((tmp_path / "data/prepared/dataset.json").read_text())["digest"]
    sha = hashlib.sha256((tmp_path / "models/pretrain/encoder.safetensors").read_bytes())
    for metrics, stage in ((probe, "probe"), (finetune, "finetune")):
        assert metrics["lineage"]["dataset_digest"] == digest
        assert metrics["lineage"]["encoder_sha256"] == sha.hexdigest()
        assert metrics["lineage"]["protocol"].startswith(f"{stage}:")
    spec_path = tmp_path / "models/pretrain/encoder.json"
    saved = {p: p.read_bytes() for p in (tmp_path / "metrics").iterdir()}
    for change, words in (({"dataset_digest": "a" * 64}, "pretrained on data aaaaaaaaaaaa"),
                          ({"in_chans": 3}, "takes 3-channel images but")):
        spec_path.write_text(json.dumps({**spec, **change}))
        for stage in ("probe", "finetune"):
            done = _pilamim(tmp_path, stage, "--no-track")
            assert done.returncode == 1 and words in done.stderr, done.stderr[-2000:]
            assert "rerun `pilamim pretrain`" in done.stderr and "Traceback" not in done.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "metrics").iterdir()} == saved


def test_register_refuses_no_track_before_writing_anything(tmp_path, monkeypatch):
    """``--no-track`` promises no MLflow writes; register's work is one (a Model Registry
    version), so it is refused up front. Every input is in place and MLflow would default to
    ``./mlflow.db``: only the refusal keeps a store from appearing here."""
    from tests.mlflow_store import export_tiny_encoder, write_metrics, write_prepared

    monkeypatch.chdir(tmp_path)          # write_metrics reads the encoder relative to the cwd
    dump_params(Params(), tmp_path / "params")
    export_tiny_encoder(tmp_path / "models" / "pretrain")
    write_prepared(tmp_path / "data" / "prepared")
    for stage in ("probe", "finetune"):
        write_metrics(tmp_path / "metrics" / f"{stage}.json", top1=0.5, top5=0.9)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = _pilamim(tmp_path, "register", "--no-track", env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("register writes to the MLflow Model Registry; it cannot run with --no-track"
            in done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    for made in ("mlflow.db", "mlruns", "mlartifacts", ".pilamim", "metrics/register.json"):
        assert not (tmp_path / made).exists(), made
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

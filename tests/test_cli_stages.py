"""The library stages through the real CLI, as a user runs them, on tiny settings; and the exit
code that tells a transient failure (worth a retry) from the others."""

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys

import pytest
import requests
from botocore.exceptions import EndpointConnectionError, NoCredentialsError
from dvc.lock import LockError
from mlflow.exceptions import MlflowException

from pilamim import cli
from pilamim.checkout_lock import EXIT_BUSY, CheckoutBusyError
from pilamim.cli import ENV_REPORT_FILE, EXIT_TRANSIENT, failure, is_transient
from pilamim.config import Params, ParamsError
from pilamim.data.errors import DataError
from pilamim.params_files import dump_params
from pilamim.stages.runner import MissingInputError
from pilamim.tracking.server import TrackingUnavailable


def _pilamim(cwd, *args, env=None):
    return subprocess.run([sys.executable, "-m", "pilamim.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=env)


def _pilamim_here(cwd, monkeypatch, capsys, *args):
    """The CLI's ``main`` in this process (exit code, stderr): for refusals, which stop before
    any work, a subprocess would only add seconds of imports."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = cli.main(list(args))
    return code, capsys.readouterr().err


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


def test_stage_before_its_inputs_names_the_stage_to_run_first(tmp_path, monkeypatch, capsys):
    _tiny_params(tmp_path)

    def run(stage):
        return _pilamim_here(tmp_path, monkeypatch, capsys, stage, "--no-track")

    code, err = run("probe")
    assert code == 1 and "pilamim prepare" in err
    assert "Traceback" not in err
    code, err = run("prepare")
    assert code == 1 and "pilamim fetch" in err, err
    assert run("fetch")[0] == 0
    assert run("prepare")[0] == 0
    for stage in ("probe", "finetune"):
        code, err = run(stage)
        assert code == 1 and "pilamim pretrain" in err, err


@pytest.mark.slow
def test_prepare_pretrain_probe_finetune_through_the_cli(tmp_path, monkeypatch, capsys):
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
            code, err = _pilamim_here(tmp_path, monkeypatch, capsys, stage, "--no-track")
            assert code == 1 and words in err, err[-2000:]
            assert "rerun `pilamim pretrain`" in err and "Traceback" not in err
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


def _raised_from(err: Exception, cause: BaseException, implicit: bool = False) -> Exception:
    if implicit:
        err.__context__ = cause
    else:
        err.__cause__ = cause
    return err


def _sqlite_error(code: int) -> sqlite3.OperationalError:
    err = sqlite3.OperationalError("database is locked")
    err.sqlite_errorcode = code
    return err


@pytest.mark.parametrize("err", [
    TrackingUnavailable("MLflow tracking server http://x is unreachable"),
    ConnectionRefusedError("refused"),
    TimeoutError("read timed out"),
    requests.ConnectionError("refused"),
    requests.exceptions.RetryError("too many 503 error responses"),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    _sqlite_error(sqlite3.SQLITE_BUSY),
    _sqlite_error(sqlite3.SQLITE_LOCKED | (1 << 8)),              # an extended "locked" code
    LockError("Unable to acquire lock"),
    # the data package wraps botocore's connection errors: the cause decides
    _raised_from(DataError("cannot reach S3 endpoint"), EndpointConnectionError(endpoint_url="x")),
    # MLflow's REST client wraps requests' errors without `from`; its SQL store with `from`
    _raised_from(MlflowException("API request to http://x failed"),
                 requests.ConnectionError("Max retries exceeded"), implicit=True),
    _raised_from(MlflowException("(sqlite3.OperationalError) database is locked"),
                 _sqlite_error(sqlite3.SQLITE_BUSY)),
])
def test_transient_failures_exit_with_their_own_code(err):
    assert is_transient(err)
    assert failure(err)[0] == EXIT_TRANSIENT


@pytest.mark.parametrize(("err", "code"), [
    (ParamsError("params/probe.yaml: unknown key 'epoch'"), 2),
    (MissingInputError("`pilamim probe` needs x: run `pilamim pretrain` first"), 1),
    (DataError("data.source '/nope': /nope does not exist"), 1),
    (_raised_from(DataError("no credentials"), NoCredentialsError()), 1),
    (RuntimeError("pretraining loss became nan"), 1),
    # messages do not decide: these only read like outages
    (MlflowException("RESOURCE_DOES_NOT_EXIST: connection refused"), 1),
    (sqlite3.OperationalError("database is locked"), 1),
    (_sqlite_error(sqlite3.SQLITE_CORRUPT), 1),
    # a user error stays one even when raised while handling a network error
    (_raised_from(ParamsError("bad"), ConnectionError("refused")), 2),
    (_raised_from(ValueError("bad value"), ConnectionError("refused"), implicit=True), 1),
    (CheckoutBusyError("busy"), EXIT_BUSY),
])
def test_other_failures_keep_their_codes(err, code):
    assert failure(err)[0] == code


def test_a_stage_that_finds_the_tracking_server_down_exits_transient(tmp_path):
    """Reported to the file the flow names, not to stdout: exit code and message."""
    dump_params(Params(), tmp_path / "params")
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    report = tmp_path / "report.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
           ENV_REPORT_FILE: str(report)}
    done = _pilamim(tmp_path, "fetch", env=env)
    assert done.returncode == EXIT_TRANSIENT, done.stderr[-2000:]
    assert "unreachable" in done.stderr and "run it again later" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    outcome = json.loads(report.read_text())
    assert outcome["exit_code"] == EXIT_TRANSIENT and "unreachable" in outcome["error"]

"""The pretraining loop for real on the tiny embedded data: loss, outputs, resume, NaN, DDP."""

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pilamim.data.dataset import ManifestDataset
from pilamim.data.prepared import load_prepared
from pilamim.data.transforms import eval_transform
from pilamim.loggers import MemoryLogger
from pilamim.params_files import dump_params
from pilamim.train import NonFiniteLossError, pretrain
from pilamim.train.monitors import figure_batch, one_per_class
from tests.conftest import micro_run_params


def test_micro_pretrain_loss_falls_and_writes_outputs(tmp_path, tiny_prepared):
    params = micro_run_params(tmp_path, tiny_prepared, epochs=6)
    log = MemoryLogger()
    summary = pretrain(params, log)
    losses = log.series("pretrain/loss")
    assert len(losses) == summary["steps"] == 6 * (210 // 16)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    for key in ("pretrain/loss_pixel", "pretrain/loss_latent", "pretrain/loss_cls", "pretrain/lr",
                "pretrain/ema_momentum", "pretrain/grad_norm", "pretrain/images_per_s",
                "pretrain/feature_std"):
        assert log.series(key), key
    out = tmp_path / "models" / "pretrain"
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "encoder.safetensors",
                                               "encoder.json", "figures"}
    assert len(list((out / "figures").glob("recon_epoch*.png"))) == 6
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == summary["steps"] and metrics["val_loss"] > 0
    momentum = log.series("pretrain/ema_momentum")
    assert momentum[0] == pytest.approx(0.996) and momentum == sorted(momentum)


def test_reconstruction_figure_shows_one_image_per_class(tmp_path, tiny_prepared):
    """The figure's batch is the first val image of each class, in class order (a sorted
    manifest's first eight images would all be one class)."""
    assert one_per_class([0, 0, 1, 1, 2, 2], limit=2) == [0, 2]
    assert one_per_class([2, 0, 1, 0]) == [1, 2, 0]
    prepared = load_prepared(tiny_prepared)
    params = micro_run_params(tmp_path, tiny_prepared)
    batch = figure_batch(prepared, params, torch.device("cpu"))
    val = ManifestDataset(prepared, "val", eval_transform(params.model.img_size, prepared.mean,
                                                          prepared.std))
    picked = one_per_class(val.labels)
    assert sorted(val.labels[i] for i in picked) == list(range(prepared.num_classes))
    assert batch.shape[0] == prepared.num_classes
    torch.testing.assert_close(batch, torch.stack([val[i][0] for i in picked]))


def test_rerun_after_completion_does_no_training(tmp_path, tiny_prepared):
    params = micro_run_params(tmp_path, tiny_prepared, epochs=1, knn_every_epochs=1)
    first = MemoryLogger()
    pretrain(params, first)
    assert 0.0 <= first.series("pretrain/knn_top1")[0] <= 1.0
    log = MemoryLogger()
    pretrain(params, log)
    assert log.series("pretrain/loss") == []


def test_changed_recipe_starts_over_and_keeps_the_old_checkpoint(tmp_path, tiny_prepared):
    pretrain(micro_run_params(tmp_path, tiny_prepared, epochs=1))
    log = MemoryLogger()
    pretrain(micro_run_params(tmp_path, tiny_prepared, epochs=1, lr=5e-4), log)
    assert len(log.series("pretrain/loss")) == 210 // 16  # trained again from step 0
    # the old recipe's checkpoint is kept under its own key (tests/train/test_checkpoint_faults)
    assert len(list((tmp_path / "models/pretrain").glob("checkpoint-*.pt"))) == 1
    longer = MemoryLogger()  # more epochs only: continues from the checkpoint
    pretrain(micro_run_params(tmp_path, tiny_prepared, epochs=2, lr=5e-4), longer)
    assert len(longer.series("pretrain/loss")) == 210 // 16


def test_device_input_pipeline_trains_and_resumes_a_pil_run(tmp_path, tiny_prepared):
    """input_pipeline only changes where images are decoded: a run started on the PIL pipeline
    continues on the device pipeline (here PNGs decoded on the CPU) instead of starting over."""
    pretrain(micro_run_params(tmp_path, tiny_prepared, epochs=1))
    log = MemoryLogger()
    pretrain(micro_run_params(tmp_path, tiny_prepared, epochs=3, input_pipeline="device",
                              num_workers=1), log)
    losses = log.series("pretrain/loss")
    assert len(losses) == 2 * (210 // 16)  # epochs 2 and 3 only
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    assert not list((tmp_path / "models/pretrain").glob("checkpoint-*.pt"))  # same recipe


class _Interrupt(Exception):
    pass


class _StopAt(MemoryLogger):
    def __init__(self, step):
        super().__init__()
        self.stop = step

    def log_metrics(self, metrics, step):
        if step >= self.stop:
            raise _Interrupt
        super().log_metrics(metrics, step)


def _weights(tmp_path):
    path = tmp_path / "models" / "pretrain" / "checkpoint.pt"
    return torch.load(path, weights_only=True)["model"]


def test_interrupted_run_resumes_to_identical_weights(tmp_path, tiny_prepared):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    pretrain(micro_run_params(full_dir, tiny_prepared, checkpoint_every_steps=4))
    cut = micro_run_params(cut_dir, tiny_prepared, checkpoint_every_steps=4)
    with pytest.raises(_Interrupt):
        pretrain(cut, _StopAt(19))  # mid-epoch 2 (13 steps/epoch); last checkpoint: step 16
    assert torch.load(cut_dir / "models/pretrain/checkpoint.pt", weights_only=True)["step"] == 16
    pretrain(cut)
    a, b = _weights(full_dir), _weights(cut_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_prepared):
    params = micro_run_params(tmp_path, tiny_prepared, lr=1e8, warmup_epochs=0,
                              checkpoint_every_steps=1)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint") as err:
        pretrain(params)
    state = torch.load(tmp_path / "models/pretrain/checkpoint.pt", weights_only=True)
    assert state["step"] >= 1
    assert f"step {state['step']}" in str(err.value)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _cli(workdir, params, *extra, world=1):
    pdir = workdir / "params"
    dump_params(params, pdir)
    launcher = [sys.executable, "-m", "pilamim.cli"]
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                    "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "pilamim.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [*launcher, "pretrain", "--params", str(pdir), *extra], env


def _workdir(cmd):
    """The run's own checkout (its params folder's parent): each run holds its working
    directory (pilamim.checkout_lock), so runs started from one folder would refuse each
    other."""
    return Path(cmd[cmd.index("--params") + 1]).parent


def _run_ok(cmd, env):
    """Run a stage command; on failure show its stderr (CalledProcessError hides it)."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_workdir(cmd))
    assert done.returncode == 0, done.stderr[-3000:]


def _sigkill_at_first_checkpoint(cmd, env, ckpt):
    """Start a stage command and SIGKILL it as soon as its first checkpoint exists."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=_workdir(cmd))
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _sigkill_job_when(proc, path, timeout=180.0):
    """SIGKILL a torchrun job, launcher and ranks, as soon as ``path`` exists. torchrun starts
    each rank in a session of its own, so killing the launcher's process group alone leaves
    the ranks training to the end (they only fail at the final barrier): that is no kill."""
    import psutil

    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    launcher = psutil.Process(proc.pid)
    job = [launcher, *launcher.children(recursive=True)]
    for member in job:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    psutil.wait_procs(job, timeout=30)
    proc.wait()


@pytest.mark.slow
def test_ddp_matches_one_process_resumes_after_sigkill_and_continues_on_one_process(
        tmp_path, tiny_prepared):
    """DDP through the real torchrun launcher and stage command, one job killed mid-run and
    continued two ways (one torchrun kill serves both, the costliest part of the test):

    - 2 gloo processes equal one process of the same global batch (gradient accumulation);
    - killed with the whole job after a checkpoint and started again on 2 processes, the run
      ends on the uninterrupted DDP run's weights and loss curve; only rank 0 wrote checkpoints;
    - a copy of the killed run continued on 1 process with the per-process batch kept (another
      global batch) stops with the fix and changes nothing; with the batch doubled it ends on
      the 1-process run's weights."""
    one, full_dir, cut_dir = tmp_path / "one", tmp_path / "full", tmp_path / "cut"
    # fp32: split over 2 ranks, a bf16 step rounds differently from one process (~3e-5 apart
    # after 2 epochs, on a CPU where `precision: auto` is bf16); equivalence is an fp32 claim.
    common = dict(epochs=2, accum_steps=2, checkpoint_every_steps=3, figure_every_epochs=0,
                  precision="fp32")
    _run_ok(*_cli(one, micro_run_params(one, tiny_prepared, batch_size=8, **common)))
    ddp = dict(common, batch_size=4)
    _run_ok(*_cli(full_dir, micro_run_params(full_dir, tiny_prepared, **ddp), world=2))
    a = load_file(str(one / "models/pretrain/encoder.safetensors"))
    b = load_file(str(full_dir / "models/pretrain/encoder.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
    assert json.loads((full_dir / "metrics/pretrain.json").read_text())["world_size"] == 2

    cmd, env = _cli(cut_dir, micro_run_params(cut_dir, tiny_prepared, **ddp), world=2)
    ckpt = cut_dir / "models/pretrain/checkpoint.pt"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=_workdir(cmd))
    _sigkill_job_when(proc, ckpt)  # the launcher and both ranks, mid-run
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    total = torch.load(full_dir / "models/pretrain/checkpoint.pt", weights_only=True)["step"]
    assert 0 < killed_at < total, "the kill must land mid-run for this test to mean anything"
    solo_dir = tmp_path / "solo"  # the same killed run, to continue on one process
    shutil.copytree(cut_dir, solo_dir)

    _run_ok(*_cli(cut_dir, micro_run_params(cut_dir, tiny_prepared, **ddp), world=2))
    a, b = _weights(full_dir), _weights(cut_dir)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    # rank 0 alone writes: one checkpoint (plus its atomic-write leftovers: none)
    assert sorted(p.name for p in ckpt.parent.glob("*checkpoint*")) == ["checkpoint.pt"]
    # and one loss curve: the resumed job's steps are the uninterrupted job's, none twice
    def steps(workdir):
        with open(workdir / "plots" / "pretrain.csv", newline="") as handle:
            return [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps(cut_dir) == steps(full_dir) and len(steps(full_dir)) > 1

    solo_ckpt = solo_dir / "models/pretrain/checkpoint.pt"
    cmd, env = _cli(solo_dir, micro_run_params(solo_dir, tiny_prepared, **ddp))
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_workdir(cmd))
    assert refused.returncode != 0
    assert "trained on 2 process(es)" in refused.stderr, refused.stderr[-2000:]
    assert "pretrain.batch_size=8" in refused.stderr
    assert sorted(p.name for p in solo_ckpt.parent.glob("*checkpoint*")) == ["checkpoint.pt"]
    assert torch.load(solo_ckpt, weights_only=True)["step"] == killed_at

    _run_ok(*_cli(solo_dir, micro_run_params(solo_dir, tiny_prepared, batch_size=8, **common)))
    a, b = _weights(one), _weights(solo_dir)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k


@pytest.mark.slow
def test_streaming_from_s3_killed_and_restarted_matches_local_shards(
        tmp_path, tiny_prepared, seaweedfs, monkeypatch):
    """The same images as shards in S3 (real SeaweedFS), read through the node cache: a run
    SIGKILLed mid-run and started again ends on the weights of an uninterrupted run on local
    shards (same digest, same bytes, same samples)."""
    from pilamim.config import DataParams
    from pilamim.data.prepare import prepare

    local = json.loads((Path(tiny_prepared) / "dataset.json").read_text())
    seaweedfs.client().create_bucket(Bucket="pilamim-train-s3")
    for name, value in {**seaweedfs.env(), "PILAMIM_SHARD_CACHE_DIR": str(tmp_path / "cache"),
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    remote = prepare(DataParams(raw_dir=str(Path(tiny_prepared).parent / "raw"),
                                out_dir=str(tmp_path / "s3-prepared"), max_images_per_class=30,
                                shards_uri="s3://pilamim-train-s3/sets"))
    assert remote.digest == local["digest"] and remote.location

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    common = dict(epochs=3, checkpoint_every_steps=3, figure_every_epochs=0)
    _run_ok(*_cli(full_dir, micro_run_params(full_dir, tiny_prepared, **common)))
    cmd, env = _cli(cut_dir, micro_run_params(cut_dir, str(remote.out_dir), **common))
    ckpt = cut_dir / "models/pretrain/checkpoint.pt"
    _sigkill_at_first_checkpoint(cmd, env, ckpt)
    assert 0 < torch.load(ckpt, weights_only=True)["step"] < 39
    _run_ok(cmd, env)
    a, b = _weights(full_dir), _weights(cut_dir)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    assert list((tmp_path / "cache").rglob("*.bin"))  # it did read through the cache

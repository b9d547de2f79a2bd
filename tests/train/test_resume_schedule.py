"""Resuming a run with another ``epochs`` (#13 item 2), for real on the tiny data, on CPU.

``epochs`` is the one recipe value a resume may change. A checkpoint that has trained past the
requested epochs is refused (it is not that run, and there is nothing to train), with nothing
saved touched; a longer schedule keeps the lr the run started with (``base_lr: auto`` is
resolved once, at the first start, and stored in the checkpoint) and is recorded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import pilamim.recipes as recipes
import pilamim.stages.pretrain as pretrain_stage
from pilamim.loggers import MemoryLogger
from pilamim.schedules import cosine_with_warmup
from pilamim.train import pretrain
from pilamim.train.loop import resume_step
from tests.conftest import micro_run_params
from tests.train.test_checkpoint_faults import _cli, _saved

STEPS_PER_EPOCH = 210 // 16  # the tiny train split, batch 16
WARMUP_STEPS = round(0.5 * STEPS_PER_EPOCH)  # micro_run_params: warmup_epochs 0.5


def _params(workdir: Path, data: str, **changes):
    """A seconds-long run; no figures (they cost time and are not what is tested here)."""
    return micro_run_params(workdir, data, **{"figure_every_epochs": 0, **changes})


def _auto_lr(workdir: Path, data: str, **changes):
    """``base_lr: auto`` (micro_run_params sets an absolute lr, which would override it)."""
    return _params(workdir, data, lr=None, base_lr="auto", **changes)


def _ckpt(workdir: Path) -> dict:
    return torch.load(workdir / "models/pretrain/checkpoint.pt", weights_only=True)


def _metrics(workdir: Path) -> dict:
    return json.loads((workdir / "metrics/pretrain.json").read_text())


def _lr_curve(workdir: Path) -> dict[int, float]:
    """plots/pretrain.csv's lr column by step: the row of step s is the lr of step s - 1."""
    with open(workdir / "plots/pretrain.csv", newline="") as handle:
        return {int(row["step"]): float(row["lr"]) for row in csv.DictReader(handle)}


@pytest.fixture
def lr_depends_on_length(monkeypatch):
    """``auto`` gives one base lr for every run under 1,000 steps; scaled down here so that 13
    and 26 steps resolve to different lrs (as 24 and 32 epochs do at full size)."""
    monkeypatch.setattr(recipes, "LONG_RUN_STEPS", 100)
    assert recipes.short_run_base_lr(STEPS_PER_EPOCH) != \
        recipes.short_run_base_lr(2 * STEPS_PER_EPOCH)


# --- a checkpoint past the requested epochs --------------------------------------------------

def test_checkpoint_past_the_requested_epochs_is_refused_and_nothing_changes(
        tmp_path, tiny_prepared):
    pretrain(_params(tmp_path, tiny_prepared, epochs=2))
    before = _saved(tmp_path)
    ckpt = tmp_path / "models/pretrain/checkpoint.pt"
    shorter = _params(tmp_path, tiny_prepared, epochs=1)

    log = MemoryLogger()
    for attempt in (lambda: pretrain(shorter, log), lambda: resume_step(shorter)):  # loop, stage
        with pytest.raises(RuntimeError) as err:
            attempt()
        message = str(err.value)
        assert str(ckpt) in message and "\n" not in message
        assert "2 epochs (26 steps)" in message and "pretrain.epochs=1 (13 steps)" in message
        assert "set pretrain.epochs to 2 or more" in message
    assert log.series("pretrain/loss") == []
    assert _saved(tmp_path) == before  # checkpoint, encoder, metrics and curves as they were


def test_cli_refuses_a_shorter_schedule_and_says_what_to_do(tmp_path, tiny_prepared):
    pretrain(_params(tmp_path, tiny_prepared, epochs=2))
    before = _saved(tmp_path)
    ckpt = tmp_path / "models/pretrain/checkpoint.pt"
    done = _cli(tmp_path, _params(tmp_path, tiny_prepared, epochs=1))
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"pilamim pretrain: error: {ckpt} has trained" in done.stderr
    assert "Traceback" not in done.stderr
    assert {k: v for k, v in _saved(tmp_path).items() if not k.startswith("params/")} == before
    assert _metrics(tmp_path)["epochs"] == 2 and _metrics(tmp_path)["steps"] == 26


def test_kept_checkpoint_of_another_recipe_past_the_requested_epochs_is_refused(
        tmp_path, tiny_prepared):
    """The refusal holds for a recipe's own ``checkpoint-<key>.pt`` too (the one a rerun of
    that recipe would resume), and names that file."""
    pretrain(_params(tmp_path, tiny_prepared, epochs=2))
    pretrain(_params(tmp_path, tiny_prepared, epochs=1, lr=5e-4))  # takes over checkpoint.pt
    kept = list((tmp_path / "models/pretrain").glob("checkpoint-*.pt"))
    assert len(kept) == 1
    before = _saved(tmp_path)
    with pytest.raises(RuntimeError, match="2 epochs") as err:
        pretrain(_params(tmp_path, tiny_prepared, epochs=1))
    assert str(kept[0]) in str(err.value)
    assert _saved(tmp_path) == before


def test_shorter_schedule_of_an_unfinished_run_trains_to_the_new_end(tmp_path, tiny_prepared):
    """A checkpoint short of the new end is continued to it: metrics say what the encoder
    trained (2 epochs), and that the run was started as a 3-epoch run."""
    class Stop(Exception):
        pass

    class StopAt(MemoryLogger):
        def log_metrics(self, metrics, step):
            if step > STEPS_PER_EPOCH + 2:
                raise Stop
            super().log_metrics(metrics, step)

    with pytest.raises(Stop):
        pretrain(_params(tmp_path, tiny_prepared, epochs=3, checkpoint_every_steps=15), StopAt())
    assert _ckpt(tmp_path)["step"] == 15
    log = MemoryLogger()
    pretrain(_params(tmp_path, tiny_prepared, epochs=2), log)
    assert len(log.series("pretrain/loss")) == 2 * STEPS_PER_EPOCH - 15
    metrics = _metrics(tmp_path)
    assert (metrics["epochs"], metrics["steps"], metrics["started_epochs"]) == (2, 26, 3)
    assert metrics["schedule_changes"] == [{"at_step": 15, "from_epochs": 3, "to_epochs": 2}]


# --- a longer schedule -----------------------------------------------------------------------

def test_longer_schedule_keeps_the_peak_lr_the_run_started_with(
        tmp_path, tiny_prepared, lr_depends_on_length, capsys):
    pretrain_stage.run(_auto_lr(tmp_path, tiny_prepared, epochs=1))
    first = _metrics(tmp_path)
    assert first["base_lr"] == recipes.short_run_base_lr(STEPS_PER_EPOCH)
    capsys.readouterr()

    pretrain_stage.run(_auto_lr(tmp_path, tiny_prepared, epochs=2))
    total = 2 * STEPS_PER_EPOCH
    curve = _lr_curve(tmp_path)
    assert sorted(curve) == list(range(1, total + 1))
    for step in range(STEPS_PER_EPOCH + 1, total + 1):  # after the resume: the first peak lr,
        expected = cosine_with_warmup(step - 1, total, WARMUP_STEPS, first["peak_lr"])  # cosine
        assert curve[step] == pytest.approx(expected, rel=1e-9), step  # over the new total
    second = _metrics(tmp_path)
    assert (second["base_lr"], second["peak_lr"]) == (first["base_lr"], first["peak_lr"])
    assert (second["epochs"], second["steps"], second["started_epochs"]) == (2, total, 1)
    assert second["schedule_changes"] == [{"at_step": STEPS_PER_EPOCH, "from_epochs": 1,
                                           "to_epochs": 2}]
    schedule = _ckpt(tmp_path)["schedule"]
    assert (schedule["base_lr"], schedule["peak_lr"]) == (first["base_lr"], first["peak_lr"])
    out = capsys.readouterr().out
    assert f"schedule extended from 1 to 2 epochs at step {STEPS_PER_EPOCH}" in out
    assert f"peak lr {first['peak_lr']:.4g}" in out


def test_extended_run_interrupted_again_resumes_its_stored_schedule(
        tmp_path, tiny_prepared, lr_depends_on_length):
    """The stored lr is saved again with every checkpoint of the extended run: interrupted and
    resumed, it ends on the weights of the extension run through, at the first run's lr."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for workdir in (whole, cut):
        pretrain(_auto_lr(workdir, tiny_prepared, epochs=1, checkpoint_every_steps=4))
    first_peak = _metrics(whole)["peak_lr"]
    pretrain(_auto_lr(whole, tiny_prepared, epochs=2, checkpoint_every_steps=4))

    class Stop(Exception):
        pass

    class StopAt(MemoryLogger):
        def log_metrics(self, metrics, step):
            if step >= 19:  # the extension's last checkpoint before that: step 16
                raise Stop
            super().log_metrics(metrics, step)

    longer = _auto_lr(cut, tiny_prepared, epochs=2, checkpoint_every_steps=4)
    with pytest.raises(Stop):
        pretrain(longer, StopAt())
    assert _ckpt(cut)["step"] == 16 and _ckpt(cut)["schedule"]["peak_lr"] == first_peak
    pretrain(longer)
    assert _metrics(cut)["peak_lr"] == first_peak
    a, b = _ckpt(whole)["model"], _ckpt(cut)["model"]
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k


def test_checkpoint_without_a_stored_schedule_resumes_and_says_so(
        tmp_path, tiny_prepared, capsys):
    """A checkpoint written before schedules were stored: its lr is resolved from the
    requested epochs as it was then, and the run says that it could not be kept."""
    pretrain(_auto_lr(tmp_path, tiny_prepared, epochs=1))
    path = tmp_path / "models/pretrain/checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state.pop("schedule", None)
    torch.save(state, path)
    capsys.readouterr()
    log = MemoryLogger()
    pretrain(_auto_lr(tmp_path, tiny_prepared, epochs=2), log)
    assert len(log.series("pretrain/loss")) == STEPS_PER_EPOCH
    assert "stores no schedule" in capsys.readouterr().out
    assert _ckpt(tmp_path)["schedule"]["peak_lr"] == _metrics(tmp_path)["peak_lr"]

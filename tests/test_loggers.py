"""The loss-curve CSV DVC plots read: a resumed run neither loses nor repeats a row."""

from __future__ import annotations

import csv

from pilamim.loggers import CSVLogger


def _rows(path):
    with open(path, newline="") as handle:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(handle)]


def test_resume_keeps_rows_up_to_the_checkpoint_step_and_appends_after_it(tmp_path):
    path = tmp_path / "plots" / "pretrain.csv"
    first = CSVLogger(path, ("loss",), prefix="pretrain/")
    for step in range(1, 8):  # killed after step 7; the checkpoint holds step 5
        first.log_metrics({"pretrain/loss": step / 10}, step)
    resumed = CSVLogger(path, ("loss",), prefix="pretrain/", resume_from_step=5)
    for step in range(6, 9):
        resumed.log_metrics({"pretrain/loss": step / 10, "pretrain/other": 1.0}, step)
    resumed.log_metrics({"pretrain/lr": 0.1}, 9)  # no value for the row's key column: no row
    assert _rows(path) == [(s, str(s / 10)) for s in range(1, 9)]


def test_a_fresh_run_starts_the_file_over(tmp_path):
    path = tmp_path / "curve.csv"
    CSVLogger(path, ("loss",)).log_metrics({"loss": 1.0}, 1)
    CSVLogger(path, ("loss",))
    assert _rows(path) == []

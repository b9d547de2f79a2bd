"""``pilamim_flows.dvc_state``: the flow's view of DVC, against the real DVC in the shared repo.

The contract: a stage run in-process and recorded with ``commit_stage`` leaves exactly the
``dvc.lock`` entry ``dvc repro`` writes, so ``dvc repro`` then has nothing to do; and calls from
several threads, or while a ``dvc`` process holds the repo lock, wait instead of failing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from pilamim_flows.dvc_state import commit_stage, is_dvc_repo, stage_up_to_date

from pilamim.params_files import load_params
from pilamim.stages.runner import execute
from tests.dvc.conftest import DvcRepo

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def lock_entry(repo: DvcRepo, stage: str) -> dict:
    return yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"][stage]


def set_data_seed(repo: DvcRepo, seed: int) -> None:
    path = repo.root / "params/data.yaml"
    values = yaml.safe_load(path.read_text())
    values["seed"] = seed
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def test_outside_a_dvc_repo_nothing_happens(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_dvc_repo(tmp_path)
    assert not stage_up_to_date("probe", tmp_path)
    commit_stage("probe", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_up_to_date_before_and_after_repro(dvc_repo):
    assert is_dvc_repo(dvc_repo.root)
    assert dvc_repo.before_repro == {"fetch": False, "register": False}
    assert stage_up_to_date("fetch", dvc_repo.root)
    assert stage_up_to_date("register", dvc_repo.root)
    assert not stage_up_to_date("no-such-stage", dvc_repo.root)


def test_commit_after_an_in_process_run_writes_what_repro_writes(dvc_repo, monkeypatch):
    monkeypatch.chdir(dvc_repo.root)
    for key, value in dvc_repo.s3.env().items():  # prepare re-reads the S3 source
        monkeypatch.setenv(key, value)
    set_data_seed(dvc_repo, 1)  # another split
    assert not stage_up_to_date("prepare")

    execute("prepare", load_params("params"), track=False)
    commit_stage("prepare")
    assert stage_up_to_date("prepare")
    # DVC now sees what the flow did: prepare is done, its consumers are not
    assert set(dvc_repo.dvc_json("status")) == {"pretrain", "probe", "finetune", "register"}
    committed = lock_entry(dvc_repo, "prepare")
    assert committed["params"]["params/data.yaml"]["seed"] == 1
    dvc_repo.dvc("repro", "--force", "--single-item", "prepare")
    assert lock_entry(dvc_repo, "prepare") == committed

    set_data_seed(dvc_repo, 0)  # back to the split everything downstream was made from
    execute("prepare", load_params("params"), track=False)
    commit_stage("prepare")
    assert dvc_repo.dvc_json("status") == {}


def test_threads_commit_and_ask_at_once(dvc_repo, monkeypatch):
    monkeypatch.chdir(dvc_repo.root)
    calls = [(commit_stage, "probe"), (commit_stage, "finetune"),
             (stage_up_to_date, "probe"), (stage_up_to_date, "finetune")]
    with ThreadPoolExecutor(len(calls)) as pool:
        results = [f.result() for f in [pool.submit(fn, stage) for fn, stage in calls]]
    assert results == [None, None, True, True]
    assert dvc_repo.dvc_json("status") == {}


def test_waits_while_a_dvc_process_holds_the_repo_lock(dvc_repo):
    hold_s = 6.0  # longer than DVC's own ~3 s of retries
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dvc.repo import Repo\n"
         "repo = Repo(); repo.lock.lock(); print('locked', flush=True)\n"
         f"time.sleep({hold_s}); repo.lock.unlock()"],
        cwd=dvc_repo.root, env=dvc_repo.env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        assert stage_up_to_date("register", dvc_repo.root)
        assert time.monotonic() - start > 3.0
    finally:
        holder.wait(30)
    assert holder.returncode == 0

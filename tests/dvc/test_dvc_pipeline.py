"""``dvc repro``, params changes, experiments, metrics, plots and remotes with the real DVC CLI,
as a user runs them, in one temporary git repo (see conftest.py). Tests run in file order; each
leaves the repo up to date."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from tests.dvc.conftest import STAGES, DvcRepo, read_tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CACHED_OUTS = ("data/raw", "data/prepared", "models/pretrain", "models/probe", "models/finetune")


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", log)


def repro(repo: DvcRepo, *args: str) -> str:
    done = repo.dvc("repro", *args)
    return done.stdout + done.stderr


def assert_clean(repo: DvcRepo) -> None:
    status = repo.dvc_json("status")
    assert status == {}, status


def set_param(repo: DvcRepo, group: str, key: str, value) -> None:
    path = repo.root / "params" / f"{group}.yaml"
    values = yaml.safe_load(path.read_text())
    values[key] = value
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def test_repro_runs_every_stage_in_order(dvc_repo):
    assert ran_stages(dvc_repo.first_repro) == list(STAGES), dvc_repo.first_repro[-3000:]
    lock = yaml.safe_load((dvc_repo.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # what the source held is versioned as its inventory (+ fetch report), not a copy of it
    raw = next(o for o in lock["stages"]["fetch"]["outs"] if o["path"] == "data/raw")
    assert raw["nfiles"] == 2
    assert json.loads((dvc_repo.root / "metrics/register.json").read_text())["action"] == (
        "champion")
    # DVC git-ignores its cached outputs; metrics and plots stay for git
    assert "/raw" in (dvc_repo.root / "data/.gitignore").read_text()
    untracked = dvc_repo.run("git", "status", "--porcelain", "--untracked-files=all").stdout
    assert "metrics/probe.json" in untracked and "plots/pretrain.csv" in untracked
    assert "models/pretrain/" not in untracked and "data/raw/" not in untracked


def test_second_repro_does_nothing(dvc_repo):
    log = repro(dvc_repo)
    assert ran_stages(log) == []
    assert "Data and pipelines are up to date" in log
    assert_clean(dvc_repo)


def test_probe_param_change_reruns_probe_and_register_only(dvc_repo):
    set_param(dvc_repo, "probe", "epochs", 3)
    status = dvc_repo.dvc_json("status")
    assert set(status) == {"probe"}, status
    log = repro(dvc_repo)
    assert ran_stages(log) == ["probe", "register"], log[-3000:]
    assert_clean(dvc_repo)


def test_editing_the_promotion_gate_reruns_register_only(dvc_repo):
    """The gate is code register runs (its import closure, tests/dvc/test_dvc_yaml.py): editing
    it makes register, and nothing upstream, stale."""
    gate = dvc_repo.root / "pilamim" / "registry" / "promotion.py"
    gate.write_text(gate.read_text() + "\n# an edit to the promotion gate\n")
    status = dvc_repo.dvc_json("status")
    assert set(status) == {"register"}, status
    log = repro(dvc_repo)
    assert ran_stages(log) == ["register"], log[-3000:]
    assert_clean(dvc_repo)


def test_metrics_show_lists_each_stage(dvc_repo):
    shown = dvc_repo.dvc_json("metrics", "show")
    files = shown[""]["data"]  # "" = the workspace
    probe = files["metrics/probe.json"]["data"]
    assert 0.0 <= probe["top1"] <= probe["top5"] <= 1.0
    assert "top1" in files["metrics/finetune.json"]["data"]
    assert files["metrics/register.json"]["data"]["version"] >= 1
    table = dvc_repo.dvc("metrics", "show").stdout
    assert "metrics/probe.json" in table and "top1" in table


def test_plots_show_renders_curves_and_images(dvc_repo, tmp_path):
    shown = dvc_repo.dvc_json("plots", "show")["data"]
    ids = set(shown)
    assert {"pretrain-loss", "eval-val-top1", "eval-train-loss"} <= ids, ids
    loss = shown["pretrain-loss"][0]["content"]
    assert "loss_pixel" in json.dumps(loss)
    assert any("confusion_matrix.png" in i for i in ids), ids
    dvc_repo.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots/index.html").stat().st_size > 1000


def _wipe_cache_and_outs(repo: DvcRepo) -> None:
    shutil.rmtree(repo.root / ".dvc/cache")
    for out in CACHED_OUTS:
        shutil.rmtree(repo.root / out)


def _round_trip(repo: DvcRepo, remote: str) -> None:
    """push, delete the cache and every cached out, pull: byte-identical and up to date."""
    before = read_tree(repo.root, *CACHED_OUTS)
    repo.dvc("push", "-r", remote)
    _wipe_cache_and_outs(repo)
    assert repo.dvc_json("status") != {}
    repo.dvc("pull", "-r", remote)
    assert read_tree(repo.root, *CACHED_OUTS) == before
    assert_clean(repo)


def test_push_pull_round_trip_to_a_local_folder(dvc_repo, tmp_path):
    dvc_repo.dvc("remote", "add", "-d", "folder", str(tmp_path / "dvc-remote"))
    _round_trip(dvc_repo, "folder")
    assert any((tmp_path / "dvc-remote").rglob("*"))


def test_push_pull_round_trip_to_s3(dvc_repo):
    """Credentials only from the environment (AWS_ACCESS_KEY_ID ...), endpoint in the config."""
    s3 = dvc_repo.s3
    s3.client().create_bucket(Bucket="dvc-store")
    dvc_repo.dvc("remote", "add", "s3store", "s3://dvc-store/dvc")
    dvc_repo.dvc("remote", "modify", "--local", "s3store", "endpointurl", s3.endpoint_url)
    assert s3.secret_key not in (dvc_repo.root / ".dvc/config").read_text()
    _round_trip(dvc_repo, "s3store")
    keys = s3.client().list_objects_v2(Bucket="dvc-store", Prefix="dvc/")
    assert keys["KeyCount"] > 0


def test_s3_remote_honours_aws_endpoint_url(dvc_repo):
    """No endpointurl in DVC's config: AWS_ENDPOINT_URL (set in the env) points at the server."""
    dvc_repo.dvc("remote", "modify", "--local", "--unset", "s3store", "endpointurl")
    _wipe_cache_and_outs(dvc_repo)
    dvc_repo.dvc("pull", "-r", "s3store")
    assert_clean(dvc_repo)


@pytest.mark.slow
def test_exp_run_with_a_pretrain_param(dvc_repo):
    """An experiment on more epochs resumes from the persisted checkpoint and reruns
    everything downstream of pretrain, nothing upstream."""
    steps_before = len((dvc_repo.root / "plots/pretrain.csv").read_text().splitlines())
    done = dvc_repo.dvc("exp", "run", "-S", "params/pretrain.yaml:epochs=2")
    log = done.stdout + done.stderr
    assert ran_stages(log) == ["pretrain", "probe", "finetune", "register"], log[-3000:]
    assert "resuming from models/pretrain/checkpoint.pt" in log
    assert yaml.safe_load((dvc_repo.root / "params/pretrain.yaml").read_text())["epochs"] == 2
    steps_after = len((dvc_repo.root / "plots/pretrain.csv").read_text().splitlines())
    assert steps_after > steps_before  # the loss curve went on where it stopped
    assert_clean(dvc_repo)
    exps = dvc_repo.dvc_json("exp", "show")
    text = json.dumps(exps)
    assert '"epochs": 2' in text and "metrics/probe.json" in text

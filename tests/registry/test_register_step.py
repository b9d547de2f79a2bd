"""Registration and the promotion gate against a real MLflow store (SQLite in tmp_path)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

from pilamim import cli
from pilamim.config import Params
from pilamim.registry import store
from pilamim.registry.embedder import load_timm_encoder
from pilamim.registry.model_logging import load_registered_encoder, log_encoder_model
from pilamim.registry.promotion import CHALLENGER, CHAMPION, decide_promotion
from pilamim.stages import register as register_step
from pilamim.stages.lineage import LineageError, encoder_sha256
from tests.mlflow_store import (
    FEATURE_DIM,
    TINY_KWARGS,
    export_tiny_encoder,
    write_metrics,
    write_prepared,
)

# ----------------------------------------------------------------------------- the gate (pure)


@pytest.mark.parametrize(
    ("new", "champ", "margin", "floor", "action", "words"),
    [
        (0.50, None, 0.0, 0.2, CHAMPION, "no champion yet"),
        (0.10, None, 0.0, 0.2, CHALLENGER, "below the floor"),
        (0.60, 0.50, 0.0, 0.2, CHAMPION, "beats champion"),
        (0.50, 0.50, 0.0, 0.2, CHALLENGER, "does not reach"),       # a tie does not beat
        (0.40, 0.50, 0.0, 0.2, CHALLENGER, "does not reach"),       # worse
        (0.52, 0.50, 0.05, 0.2, CHALLENGER, "does not reach"),      # better, below margin
        (0.55, 0.50, 0.05, 0.2, CHAMPION, "beats champion"),        # exactly the margin
        (0.15, 0.10, 0.0, 0.2, CHALLENGER, "below the floor"),      # better but below floor
    ],
)
def test_gate_branches(new, champ, margin, floor, action, words):
    champion = None if champ is None else {"probe_top1": champ}
    decision = decide_promotion({"probe_top1": new}, champion, "probe_top1", margin, floor)
    assert decision.action == action
    assert words in decision.reason
    assert decision.value == new and decision.champion_value == champ


def test_gate_champion_without_gate_metric_and_bad_inputs():
    decision = decide_promotion({"knn_top1": 0.7}, {"probe_top1": 0.9}, "knn_top1", 0.0, 0.2)
    assert decision.action == CHAMPION and "has no knn_top1" in decision.reason
    assert decide_promotion({"probe_top1": math.nan}, None).action == CHALLENGER
    with pytest.raises(ValueError, match="gate metric 'probe_top1' missing"):
        decide_promotion({"top1": 0.5}, None)


# ----------------------------------------------------------------------------- input errors


def test_missing_gate_metric_file_names_the_stage_and_touches_nothing(tmp_path, params,
                                                                       encoder_dir):
    (tmp_path / "mlflow.db").unlink()            # prove no store is even opened
    with pytest.raises(FileNotFoundError, match=r"run `pilamim probe` first"):
        register_step.register(params)
    finetune_gate = params.model_copy(deep=True)
    finetune_gate.register.gate_metric = "finetune_top1"
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5, top5=0.9)
    with pytest.raises(FileNotFoundError, match=r"run `pilamim finetune` first"):
        register_step.register(finetune_gate)
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "metrics" / "register.json").exists()


def test_missing_encoder_and_percent_metrics_are_explained(tmp_path, params):
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    with pytest.raises(FileNotFoundError, match=r"run `pilamim pretrain` first"):
        register_step.register(params)
    write_metrics(tmp_path / "metrics" / "probe.json", top1=85.0)
    with pytest.raises(ValueError, match="not a fraction"):
        register_step.read_eval_metrics(params.register)


# ----------------------------------------------------------------------------- the whole step


def _run_register(tmp_path: Path, params: Params, top1: float, seed: int | None = None) -> dict:
    """Register with these metrics; ``seed`` first exports new weights (a new version)."""
    if seed is not None:
        export_tiny_encoder(tmp_path / "models" / "pretrain", seed=seed)
    write_metrics(tmp_path / "metrics" / "probe.json", top1=top1, top5=0.9, knn_top1=0.4)
    write_metrics(tmp_path / "metrics" / "finetune.json", top1=0.7, top5=0.95)
    return register_step.register(params)


def test_register_gates_versions_and_tags_lineage(tmp_path, params, encoder_dir):
    digest = write_prepared(tmp_path / "data" / "prepared")
    params.register.min_improvement = 0.01
    first = _run_register(tmp_path, params, 0.50)
    assert first["action"] == CHAMPION and first["version"] == 1
    assert json.loads((tmp_path / "metrics" / "register.json").read_text()) == first

    second = _run_register(tmp_path, params, 0.505, seed=1)       # better, but under the margin
    assert second["action"] == CHALLENGER and second["champion_version_before"] == 1
    third = _run_register(tmp_path, params, 0.60, seed=2)
    assert third["action"] == CHAMPION and third["champion_value_before"] == 0.50

    client = MlflowClient()
    name = params.register.model_name
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["decision"] == CHALLENGER and "does not reach" in tags["decision_reason"]
    assert tags["data_digest"] == digest
    assert tags["params_hash"] and len(tags["params_hash"]) == 64
    assert tags["git_commit"]                       # a hash, or "unknown" outside git
    assert tags["pipeline_id"] == second["pipeline_id"]
    assert float(tags["metric.probe_top1"]) == 0.505
    assert float(tags["metric.finetune_top1"]) == 0.7
    assert "encoder_uri" not in tags and "embedder_uri" not in tags     # one model: the source
    version = client.get_model_version(name, "2")
    assert second["logged_model_uri"] == second["embedder_uri"] == version.source
    assert second["encoder_uri"] == version.source           # load_registered_encoder takes it
    assert second["model_uri"] == f"models:/{name}/2"

    run = client.get_run(third["run_id"])
    assert run.data.tags["pilamim.stage"] == "register"
    assert run.data.tags["pilamim.decision"] == CHAMPION
    assert run.data.metrics["probe_top1"] == 0.60
    assert run.inputs.dataset_inputs[0].dataset.digest == digest[:36]

    rows = store.list_models(name)
    assert [(r["version"], r["aliases"]) for r in rows] == [
        ("1", []), ("2", [CHALLENGER]), ("3", [CHAMPION])]
    table = cli.format_models(rows)
    assert "champion" in table and "0.6000" in table

    # Humans may overrule the gate; a missing version is explained with the ones that exist.
    promoted = store.promote(name, 2)
    assert promoted.aliases == [CHAMPION]               # no longer also @challenger
    assert client.get_model_version(name, "2").tags["decision"] == CHAMPION
    with pytest.raises(store.RegistryError, match=r"no version '7'; existing versions: 1, 2, 3"):
        store.promote(name, 7)
    with pytest.raises(store.RegistryError, match=r"no registered model 'nope'.*" + name):
        store.promote("nope", 1)


def test_a_model_without_champion_is_a_normal_state(tmp_path, params, encoder_dir):
    """The first version below the floor leaves the model without @champion (and a human may
    remove it): the next register and promote go on, as on an empty registry."""
    write_prepared(tmp_path / "data" / "prepared")
    params.register.floor = 0.3
    first = _run_register(tmp_path, params, 0.10)
    assert first["action"] == CHALLENGER
    client = MlflowClient()
    name = params.register.model_name
    assert store.get_alias(client, name, CHAMPION) is None
    second = _run_register(tmp_path, params, 0.50, seed=1)
    assert second["action"] == CHAMPION and second["version"] == 2
    client.delete_registered_model_alias(name, CHAMPION)
    third = _run_register(tmp_path, params, 0.40, seed=2)
    assert third["action"] == CHAMPION and third["champion_version_before"] is None
    assert CHAMPION in store.promote(name, 2).aliases
    assert [r["aliases"] for r in store.list_models(name)][1] == [CHAMPION]


def test_logged_models_embed_any_batch_size(tmp_path, params, encoder_dir):
    """@champion is the embedder over raw uint8 pixels, and holds the timm module."""
    write_prepared(tmp_path / "data" / "prepared")
    record = _run_register(tmp_path, params, 0.5)
    name = params.register.model_name
    uri = f"models:/{name}@champion"
    config = json.loads((encoder_dir / "encoder.json").read_text())
    reference = load_timm_encoder(encoder_dir / "encoder.safetensors", config)

    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 16, 16, 1), dtype=np.uint8)
    embedder = mlflow.pyfunc.load_model(uri)                           # input example: batch 2
    embedded = embedder.predict(pixels)
    assert embedded.shape == (5, FEATURE_DIM) and embedded.dtype == np.float32
    normalised = (pixels.transpose(0, 3, 1, 2) / 255.0 - config["mean"][0]) / config["std"][0]
    batch = torch.from_numpy(normalised.astype(np.float32))
    with torch.no_grad():
        expected = reference(batch).numpy()
    np.testing.assert_allclose(embedded, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(mlflow.exceptions.MlflowException, match="dtype of input float32"):
        embedder.predict(batch.numpy())                     # normalised floats: not this model

    for source in (uri, record["encoder_uri"], f"models:/{name}/{record['version']}"):
        module = load_registered_encoder(source)
        assert isinstance(module, timm.models.VisionTransformer) and not module.training
        assert module.patch_embed.proj.in_channels == TINY_KWARGS["in_chans"]
        with torch.no_grad():
            np.testing.assert_allclose(module(batch).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_version_registered_with_the_torch_model_as_source_is_recorded_as_such(
        tmp_path, params, encoder_dir):
    """Versions from before the embedder was the registered model (source: the PyTorch model,
    tag ``embedder_uri``) are reused for the same weights; the record says which is which."""
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    config = json.loads((encoder_dir / "encoder.json").read_text())
    with mlflow.start_run():
        logged = log_encoder_model(encoder_dir)
        torch_uri = mlflow.pytorch.log_model(    # as register logged it then: pickled
            load_timm_encoder(encoder_dir / "encoder.safetensors", config), name="encoder",
            serialization_format="pickle", pip_requirements=["torch"]).model_uri
    store.register_version(params.register.model_name, torch_uri, {
        "encoder_sha256": encoder_sha256(encoder_dir), "embedder_uri": logged.embedder_uri})
    record = register_step.register(params)
    assert record["version"] == 1 and record["action"] == CHAMPION
    assert record["logged_model_uri"] == record["encoder_uri"] == torch_uri
    assert record["embedder_uri"] == logged.embedder_uri
    # Its safetensors are in the embedder, named by the tag; the pickle is not read.
    assert load_registered_encoder(record["embedder_uri"]).embed_dim == FEATURE_DIM
    with pytest.raises(ValueError, match="not a pilamim embedder.*tag embedder_uri"):
        load_registered_encoder(f"models:/{params.register.model_name}@champion")


def test_list_and_promote_without_a_store_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    with pytest.raises(store.RegistryError, match="run `pilamim register`"):
        store.list_models()
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------- identity, like for like


def test_same_weights_reuse_their_version(tmp_path, params, encoder_dir):
    write_prepared(tmp_path / "data" / "prepared")
    first = _run_register(tmp_path, params, 0.50)
    again = _run_register(tmp_path, params, 0.50)
    assert again["version"] == first["version"] == 1 and again["reused"] is True
    assert again["action"] == CHAMPION and "same weights as version 1" in again["reason"]
    assert [r["version"] for r in store.list_models(params.register.model_name)] == ["1"]
    # Probed again under a changed protocol: still version 1, its tags now say how and what,
    # so the next version, measured the new way, is compared with it like for like.
    lineage = {"dataset_digest": first["data_digest"], "protocol": "probe:new",
               "encoder_sha256": first["encoder_sha256"]}
    write_metrics(tmp_path / "metrics" / "probe.json", lineage=lineage, top1=0.55)
    (tmp_path / "metrics" / "finetune.json").unlink()
    remeasured = register_step.register(params)
    assert remeasured["version"] == 1 and remeasured["reused"] is True
    tags = MlflowClient().get_model_version(params.register.model_name, "1").tags
    assert tags["eval_protocol"] == "probe:new" and float(tags["metric.probe_top1"]) == 0.55
    export_tiny_encoder(encoder_dir, seed=5)
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.60,
                  lineage={**lineage, "encoder_sha256": encoder_sha256(encoder_dir)})
    assert register_step.register(params)["action"] == CHAMPION          # 0.60 beats 0.55, alike


def test_gate_only_compares_numbers_measured_alike(tmp_path, params, encoder_dir):
    """A version probed on other data (or by another protocol) cannot take @champion from the
    gate, however high its number; the reason names both digests; a human may promote it."""
    old_digest = write_prepared(tmp_path / "data" / "prepared")
    assert _run_register(tmp_path, params, 0.27)["action"] == CHAMPION
    (tmp_path / "metrics" / "finetune.json").unlink()

    new_digest = write_prepared(tmp_path / "data" / "prepared", n=16)    # other data
    export_tiny_encoder(encoder_dir, seed=1, dataset_digest=new_digest)
    lineage = {"dataset_digest": new_digest, "encoder_sha256": encoder_sha256(
        encoder_dir), "protocol": "probe:test"}
    write_metrics(tmp_path / "metrics" / "probe.json", lineage=lineage, top1=0.60)
    other_data = register_step.register(params)
    assert other_data["action"] == CHALLENGER
    assert old_digest in other_data["reason"] and new_digest in other_data["reason"]

    write_prepared(tmp_path / "data" / "prepared")                      # back to the old data
    export_tiny_encoder(encoder_dir, seed=2)
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.90,
                  lineage={**lineage, "dataset_digest": old_digest, "protocol": "probe:other",
                           "encoder_sha256": encoder_sha256(encoder_dir)})
    other_protocol = register_step.register(params)
    assert other_protocol["action"] == CHALLENGER
    assert "probe:other vs champion's probe:test" in other_protocol["reason"]
    name = params.register.model_name
    assert str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert CHAMPION in store.promote(name, other_data["version"]).aliases


def test_register_refuses_inputs_of_different_lineages(tmp_path, params, encoder_dir):
    """Stale or mixed inputs stop before MLflow is touched, naming what to rerun."""
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    export_tiny_encoder(encoder_dir, seed=3)                  # probe.json measured the old one
    with pytest.raises(LineageError, match=r"on encoder .* rerun `pilamim probe`"):
        register_step.register(params)
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    write_metrics(tmp_path / "metrics" / "finetune.json", top1=0.6,
                  lineage={"dataset_digest": "f" * 64, "encoder_sha256": "x", "protocol": "p"})
    with pytest.raises(LineageError, match=r"finetune.json was measured on data "
                       r"ffffffffffff .* rerun `pilamim finetune`"):
        register_step.register(params)
    (tmp_path / "metrics" / "finetune.json").write_text(json.dumps({"top1": 0.6}))
    with pytest.raises(LineageError, match=r"does not say which data.*`pilamim finetune`"):
        register_step.register(params)
    (tmp_path / "metrics" / "finetune.json").unlink()
    export_tiny_encoder(encoder_dir, seed=3, dataset_digest="e" * 64)
    with pytest.raises(LineageError, match=r"pretrained on data eeeeeeeeeeee.*"
                       r"rerun `pilamim pretrain`"):
        register_step.register(params)
    assert not (tmp_path / "metrics" / "register.json").exists()
    assert MlflowClient().search_registered_models() == []


# ----------------------------------------------------------------------------- killed register

_KILLED_REGISTER = """
import os, signal
from pilamim.config import Params
from pilamim.registry import registration
from pilamim.stages.runner import execute
registration.apply_decision = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
execute("register", Params())
"""


def _register_killed_before_the_gate(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_REGISTER], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_register_after_a_killed_register_completes_it(tmp_path, params, encoder_dir):
    """SIGKILL between creating the version and deciding it: the next register decides that
    version (same weights: no second one) and ends the killed run as KILLED."""
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    write_metrics(tmp_path / "metrics" / "finetune.json", top1=0.6)
    _register_killed_before_the_gate(tmp_path)
    client = MlflowClient()
    name = params.register.model_name
    (left,) = client.search_model_versions(f"name = '{name}'")
    assert "decision" not in left.tags
    killed_run = client.get_run(left.run_id)
    assert killed_run.info.status == "RUNNING"

    record = register_step.register(params)
    assert record["version"] == 1 and record["action"] == CHAMPION
    assert client.get_run(left.run_id).info.status == "KILLED"
    assert client.get_model_version(name, "1").tags["decision"] == CHAMPION
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_a_killed_register_of_other_weights_is_marked_abandoned(tmp_path, params, encoder_dir):
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    write_metrics(tmp_path / "metrics" / "finetune.json", top1=0.6)
    _register_killed_before_the_gate(tmp_path)
    record = _run_register(tmp_path, params, 0.6, seed=4)
    assert record["version"] == 2 and record["abandoned_versions"] == [1]
    tags = MlflowClient().get_model_version(params.register.model_name, "1").tags
    assert tags["decision"] == store.ABANDONED and "version 2" in tags["decision_reason"]
    running = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("pilamim-test").experiment_id],
        filter_string="attributes.status = 'RUNNING'")
    assert running == []

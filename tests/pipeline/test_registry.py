"""Registration and the promotion gate against a real MLflow store (SQLite in tmp_path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

from pilamim import registry
from pilamim.config import Params
from pilamim.embedding_model import images_to_tensor, load_timm_encoder
from pilamim.promotion import CHALLENGER, CHAMPION, decide_promotion

from .conftest import FEATURE_DIM, TINY_KWARGS, write_metrics, write_prepared

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
        registry.register(params)
    finetune_gate = params.model_copy(deep=True)
    finetune_gate.register.gate_metric = "finetune_top1"
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5, top5=0.9)
    with pytest.raises(FileNotFoundError, match=r"run `pilamim finetune` first"):
        registry.register(finetune_gate)
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "metrics" / "register.json").exists()


def test_missing_encoder_and_percent_metrics_are_explained(tmp_path, params):
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    with pytest.raises(FileNotFoundError, match=r"run `pilamim pretrain` first"):
        registry.register(params)
    write_metrics(tmp_path / "metrics" / "probe.json", top1=85.0)
    with pytest.raises(ValueError, match="not a fraction"):
        registry.read_eval_metrics(params.register)


# ----------------------------------------------------------------------------- the whole step


def _run_register(tmp_path: Path, params: Params, top1: float) -> dict:
    write_metrics(tmp_path / "metrics" / "probe.json", top1=top1, top5=0.9, knn_top1=0.4)
    write_metrics(tmp_path / "metrics" / "finetune.json", top1=0.7, top5=0.95)
    return registry.register(params)


def test_register_gates_versions_and_tags_lineage(tmp_path, params, encoder_dir):
    digest = write_prepared(tmp_path / "data" / "prepared")
    params.register.min_improvement = 0.01
    first = _run_register(tmp_path, params, 0.50)
    assert first["action"] == CHAMPION and first["version"] == 1
    assert json.loads((tmp_path / "metrics" / "register.json").read_text()) == first

    second = _run_register(tmp_path, params, 0.505)         # better, but under the margin
    assert second["action"] == CHALLENGER and second["champion_version_before"] == 1
    third = _run_register(tmp_path, params, 0.60)
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
    assert tags["embedder_uri"].startswith("models:/")

    run = client.get_run(third["run_id"])
    assert run.data.tags["pilamim.stage"] == "register"
    assert run.data.tags["pilamim.decision"] == CHAMPION
    assert run.data.metrics["probe_top1"] == 0.60
    assert run.inputs.dataset_inputs[0].dataset.digest == digest[:36]

    rows = registry.list_models(name)
    assert [(r["version"], r["aliases"]) for r in rows] == [
        ("1", []), ("2", [CHALLENGER]), ("3", [CHAMPION])]
    table = registry.format_models(rows)
    assert "champion" in table and "0.6000" in table

    # Humans may overrule the gate; a missing version is explained with the ones that exist.
    promoted = registry.promote(name, 2)
    assert CHAMPION in promoted.aliases
    assert client.get_model_version(name, "2").tags["decision"] == CHAMPION
    with pytest.raises(registry.RegistryError, match=r"no version '7'; existing versions: 1, 2, 3"):
        registry.promote(name, 7)
    with pytest.raises(registry.RegistryError, match=r"no registered model 'nope'.*" + name):
        registry.promote("nope", 1)


def test_a_model_without_champion_is_a_normal_state(tmp_path, params, encoder_dir):
    """The first version below the floor leaves the model without @champion (and a human may
    remove it): the next register and promote go on, as on an empty registry."""
    write_prepared(tmp_path / "data" / "prepared")
    params.register.floor = 0.3
    first = _run_register(tmp_path, params, 0.10)
    assert first["action"] == CHALLENGER
    client = MlflowClient()
    name = params.register.model_name
    assert registry.get_alias(client, name, CHAMPION) is None
    second = _run_register(tmp_path, params, 0.50)
    assert second["action"] == CHAMPION and second["version"] == 2
    client.delete_registered_model_alias(name, CHAMPION)
    third = _run_register(tmp_path, params, 0.40)
    assert third["action"] == CHAMPION and third["champion_version_before"] is None
    assert CHAMPION in registry.promote(name, 2).aliases
    assert [r["aliases"] for r in registry.list_models(name)][1] == [CHAMPION]


def test_logged_models_embed_any_batch_size(tmp_path, params, encoder_dir):
    write_prepared(tmp_path / "data" / "prepared")
    record = _run_register(tmp_path, params, 0.5)
    uri = f"models:/{params.register.model_name}@champion"
    config = json.loads((encoder_dir / "encoder.json").read_text())
    reference = load_timm_encoder(encoder_dir / "encoder.safetensors", config)

    batch = np.random.default_rng(0).normal(size=(5, 1, 16, 16)).astype(np.float32)  # example: 2
    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(batch)
    assert out.shape == (5, FEATURE_DIM)
    with torch.no_grad():
        expected = reference(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    module = mlflow.pytorch.load_model(uri)
    assert isinstance(module, timm.models.VisionTransformer)
    assert module.patch_embed.proj.in_channels == TINY_KWARGS["in_chans"]

    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 1), dtype=np.uint8)
    embedder = mlflow.pyfunc.load_model(record["embedder_uri"])
    embedded = embedder.predict(pixels)
    assert embedded.shape == (3, FEATURE_DIM)
    with torch.no_grad():
        expected = reference(images_to_tensor(pixels, config["mean"], config["std"], 1)).numpy()
    np.testing.assert_allclose(embedded, expected, rtol=1e-5, atol=1e-5)


def test_list_and_promote_without_a_store_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    with pytest.raises(registry.RegistryError, match="run `pilamim register`"):
        registry.list_models()
    assert not (tmp_path / "none").exists()

"""Register an evaluated encoder: log it, create (or find) its version, gate it, record why.

The register stage (:mod:`pilamim.stages.register`) reads and checks the files and hands over a
:class:`RegisterInputs`; everything written to MLflow for it happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pilamim.config import Params
from pilamim.io import atomic_write_json
from pilamim.registry.model_logging import log_encoder_model
from pilamim.registry.promotion import CHALLENGER, CHAMPION, Decision, decide_promotion
from pilamim.registry.store import (
    METRIC_TAG_PREFIX,
    TAG_DATA_DIGEST,
    TAG_ENCODER_SHA,
    TAG_ENCODER_URI,
    TAG_PROTOCOL,
    apply_decision,
    await_turn,
    get_alias,
    register_version,
    version_metrics,
    version_with_weights,
)
from pilamim.tracking import datasets, runs


@dataclass(frozen=True)
class RegisterInputs:
    """Everything register reads from files, checked to belong together."""

    metrics: dict[str, float]
    data_digest: str
    encoder_sha256: str
    protocol: str          # of the stage that measured the gate metric

    @property
    def context(self) -> dict[str, str]:
        return {"data_digest": self.data_digest, "protocol": self.protocol}


def refresh_evaluation(client: MlflowClient, name: str, version: str,
                       inputs: RegisterInputs) -> None:
    """Record the latest evaluation of a version's weights as its metrics and protocol.

    The same weights probed again under a changed protocol keep their version; its tags then
    describe the newest measurement, so later versions, measured the new way, compare with it
    like for like instead of never being comparable with the champion again.
    """
    for key, value in inputs.metrics.items():
        client.set_model_version_tag(name, version, f"{METRIC_TAG_PREFIX}{key}", f"{value:.6g}")
    client.set_model_version_tag(name, version, TAG_PROTOCOL, inputs.protocol)


def register_encoder(params: Params, inputs: RegisterInputs, run_id: str,
                     pipeline_id: str) -> dict[str, Any]:
    """Log and register the encoder (or find its version: same weights, same version), gate
    it against the champion, record the decision; in the active MLflow run ``run_id``."""
    rp = params.register
    client = MlflowClient()
    datasets.log_dataset_input(rp.data_dir, context="registration")
    mlflow.log_metrics(inputs.metrics)
    version = version_with_weights(client, rp.model_name, inputs.encoder_sha256)
    decided = version is not None and (version.tags or {}).get("decision") in (CHAMPION,
                                                                               CHALLENGER)
    if version is None:
        logged = log_encoder_model(rp.encoder_dir)
        commit, dirty = runs.git_info()
        version = register_version(rp.model_name, logged.model_uri, {
            TAG_DATA_DIGEST: inputs.data_digest, TAG_ENCODER_SHA: inputs.encoder_sha256,
            TAG_PROTOCOL: inputs.protocol, "git_commit": commit,
            "git_dirty": str(dirty).lower(), "params_hash": runs.params_hash(params),
            "pipeline_id": pipeline_id,
            **{f"{METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in inputs.metrics.items()},
        })
    else:  # same weights: this evaluation becomes the version's (protocols may have changed)
        refresh_evaluation(client, rp.model_name, str(version.version), inputs)
    # In turn with every register of this model name, wherever it runs: read the champion,
    # decide and move the alias only after all earlier versions have (store.await_turn).
    abandoned = await_turn(client, rp.model_name, version.version, rp.turn_timeout_s)
    champion = get_alias(client, rp.model_name, CHAMPION)
    if decided:
        tags = version.tags or {}
        decision = Decision(tags["decision"], f"same weights as version {version.version} "
                            f"(registered before; its metrics now those measured by "
                            f"{inputs.protocol}): {tags.get('decision_reason', '')}",
                            tags.get("gate_metric", rp.gate_metric),
                            inputs.metrics[rp.gate_metric])
    else:
        champion_tags = (champion.tags or {}) if champion else {}
        decision = decide_promotion(
            inputs.metrics, version_metrics(champion) if champion else None, rp.gate_metric,
            rp.min_improvement, rp.floor, new_context=inputs.context,
            champion_context={"data_digest": champion_tags.get(TAG_DATA_DIGEST, ""),
                              "protocol": champion_tags.get(TAG_PROTOCOL, "")})
        apply_decision(client, rp.model_name, version.version, decision)
    # The registered source is the embedder, which also holds the encoder's safetensors
    # (model_logging.load_registered_encoder). Older versions name a pickled PyTorch model in
    # the tag ``encoder_uri``; the oldest have that as source and the embedder in ``embedder_uri``.
    version_tags = client.get_model_version(rp.model_name, str(version.version)).tags or {}
    record = {
        "model_name": rp.model_name, "version": int(version.version),
        "model_uri": f"models:/{rp.model_name}/{version.version}",
        "logged_model_uri": version.source,
        "embedder_uri": version_tags.get("embedder_uri", version.source),
        "encoder_uri": version_tags.get(TAG_ENCODER_URI, version.source),
        "action": decision.action, "reason": decision.reason, "reused": decided,
        "gate_metric": decision.gate_metric, "gate_value": decision.value,
        "champion_value_before": decision.champion_value,
        "champion_version_before": int(champion.version) if champion else None,
        "metrics": inputs.metrics, "run_id": run_id, "pipeline_id": pipeline_id,
        "data_digest": inputs.data_digest, "encoder_sha256": inputs.encoder_sha256,
        "eval_protocol": inputs.protocol, "abandoned_versions": [int(v) for v in abandoned],
    }
    out = atomic_write_json(rp.metrics_path, record)
    mlflow.set_tags({"pilamim.decision": decision.action,
                     "pilamim.registered_version": version.version})
    mlflow.log_artifact(str(out), "metrics")
    return record

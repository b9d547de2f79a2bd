"""Register the pretrained encoder in the MLflow Model Registry and gate its promotion.

The register step (:func:`register`) reads the stage outputs from files, logs the encoder as
two MLflow models in the ``register`` run (:mod:`pilamim.model_logging`), registers one
version and decides its alias:

* ``encoder`` — PyTorch flavour (pickle format, so any batch size loads), the one registered
  under ``params/register.yaml: model_name``. ``mlflow.pytorch.load_model(uri)`` gives the
  ``nn.Module``; ``mlflow.pyfunc.load_model(uri).predict(x)`` takes normalised ``float32``
  ``(N, C, H, W)`` and returns ``(N, D)`` embeddings. The MLmodel metadata carries
  ``encoder.json`` (mean/std to normalise with).
* ``embedder`` — pyfunc (:mod:`pilamim.embedding_model`) taking raw ``uint8`` ``(N, H, W, C)``
  images; its URI is in the version tag ``embedder_uri``.

The promotion gate (:func:`pilamim.promotion.decide_promotion`, pure) makes a version
``@champion`` when its gate metric clears ``floor`` and beats the current champion by at least
``min_improvement``; otherwise ``@challenger``. Decision and reason go to the version's tags and
to ``metrics/register.json``. :func:`promote` and :func:`list_models` serve humans
(``pilamim promote NAME VERSION``, ``pilamim models``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pilamim import data_lineage, tracking
from pilamim.config import Params, RegisterParams
from pilamim.io import atomic_write_json
from pilamim.model_logging import log_encoder_model, read_encoder_config
from pilamim.promotion import CHALLENGER, CHAMPION, Decision, decide_promotion
from pilamim.stages.lineage import LineageError, check_metrics_lineage, encoder_sha256

# Gate/lineage metric name -> (metrics file, key in it, stage that writes the file).
METRIC_SOURCES: dict[str, tuple[str, str, str]] = {
    "probe_top1": ("probe_metrics", "top1", "probe"),
    "probe_top5": ("probe_metrics", "top5", "probe"),
    "knn_top1": ("probe_metrics", "knn_top1", "probe"),
    "knn_top5": ("probe_metrics", "knn_top5", "probe"),
    "finetune_top1": ("finetune_metrics", "top1", "finetune"),
    "finetune_top5": ("finetune_metrics", "top5", "finetune"),
}
METRIC_TAG_PREFIX = "metric."


class RegistryError(LookupError):
    """A registry lookup a user asked for failed; the message lists what exists."""


# ----------------------------------------------------------------------------- inputs


def read_metric_files(rp: RegisterParams) -> dict[str, dict[str, Any]]:
    """The probe/finetune metrics files that exist, by their :class:`RegisterParams` field.

    The file holding the gate metric must exist ("run `pilamim probe` first"); the others are
    optional (a metric that is absent is just not recorded).
    """
    gate_file, _, gate_stage = METRIC_SOURCES[rp.gate_metric]
    gate_path = Path(getattr(rp, gate_file))
    if not gate_path.exists():
        raise FileNotFoundError(
            f"gate metric {rp.gate_metric!r} is read from {gate_path}, which does not exist — "
            f"run `pilamim {gate_stage}` first"
        )
    loaded: dict[str, dict[str, Any]] = {}
    for attr in {src[0] for src in METRIC_SOURCES.values()}:
        path = Path(getattr(rp, attr))
        if path.exists():
            loaded[attr] = json.loads(path.read_text())
    return loaded


def read_eval_metrics(rp: RegisterParams,
                      loaded: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """The metrics of :data:`METRIC_SOURCES` in the files (:func:`read_metric_files`, read
    here unless given). Values must be fractions."""
    gate_file, gate_key, gate_stage = METRIC_SOURCES[rp.gate_metric]
    gate_path = Path(getattr(rp, gate_file))
    loaded = read_metric_files(rp) if loaded is None else loaded
    metrics = {}
    for name, (attr, key, _) in METRIC_SOURCES.items():
        value = loaded.get(attr, {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[name] = float(value)
    if rp.gate_metric not in metrics:
        raise ValueError(f"{gate_path} has no numeric {gate_key!r} (gate metric "
                         f"{rp.gate_metric}); rerun `pilamim {gate_stage}`")
    if not 0.0 <= metrics[rp.gate_metric] <= 1.0:
        raise ValueError(f"{gate_path}: {gate_key}={metrics[rp.gate_metric]} is not a fraction "
                         f"in [0, 1]; floor/min_improvement in params/register.yaml assume one")
    return metrics


# ----------------------------------------------------------------------------- registry


def registry_client() -> MlflowClient:
    """A client on the resolved tracking URI, for read/alias operations by humans.

    Fails fast if an http server is down, and refuses to create an empty local store: a
    missing ``mlflow.db`` means nothing was registered yet.
    """
    uri = tracking.resolve_tracking_uri()
    tracking.check_tracking_reachable(uri)
    db = tracking.sqlite_path(uri)
    if db is not None and not db.exists():
        raise RegistryError(f"no MLflow store at {uri} — run `pilamim register` (or the "
                            f"pipeline) first, or set MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri)


def register_version(name: str, model_uri: str, tags: Mapping[str, Any]):
    """Create version N+1 of ``name`` (creating the model the first time) with ``tags``."""
    return mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})


def _is_missing(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def version_metrics(version) -> dict[str, float]:
    """The ``metric.<name>`` tags of a model version as floats."""
    out = {}
    for key, value in (version.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key[len(METRIC_TAG_PREFIX):]] = float(value)
            except ValueError:
                continue
    return out


def get_alias(client: MlflowClient, name: str, alias: str = CHAMPION):
    """The version holding ``alias``, or None when the model or the alias does not exist.

    "No champion" is a normal state (the first version fell below the floor, or a human
    removed the alias), so this reads the model's alias map instead of catching the by-alias
    lookup's error, whose code differs between stores (SQLite: INVALID_PARAMETER_VALUE).
    """
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if _is_missing(err):
            return None
        raise
    version = (model.aliases or {}).get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def apply_decision(client: MlflowClient, name: str, version: str | int,
                   decision: Decision) -> None:
    """Point alias ``decision.action`` at ``version``; record decision + reason as its tags."""
    version = str(version)
    client.set_registered_model_alias(name, decision.action, version)
    client.set_model_version_tag(name, version, "decision", decision.action)
    client.set_model_version_tag(name, version, "decision_reason", decision.reason)
    client.set_model_version_tag(name, version, "gate_metric", decision.gate_metric)


def _existing_versions(client: MlflowClient, name: str) -> list[str]:
    versions = client.search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in versions), key=int)


def _require_model(client: MlflowClient, name: str) -> None:
    """A :class:`RegistryError` listing the registered models when ``name`` is not one."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not _is_missing(err):
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"no registered model {name!r}; registered models: "
                            f"{', '.join(names) or '(none)'}") from None


def promote(name: str, version: str | int, client: MlflowClient | None = None,
            reason: str = "promoted by hand (`pilamim promote`)"):
    """Make ``version`` of ``name`` the ``@champion`` regardless of the gate.

    Raises :class:`RegistryError` naming the versions (or models) that exist when the asked
    one does not.
    """
    client = client or registry_client()
    version = str(version).strip()
    _require_model(client, name)
    existing = _existing_versions(client, name)
    if version not in existing:
        raise RegistryError(f"model {name!r} has no version {version!r}; existing versions: "
                            f"{', '.join(existing) or '(none)'}")
    before = get_alias(client, name, CHAMPION)
    was = f" (champion was version {before.version})" if before is not None else ""
    current = client.get_model_version(name, version)
    gate = (current.tags or {}).get("gate_metric", "probe_top1")
    value = version_metrics(current).get(gate, float("nan"))
    apply_decision(client, name, version, Decision(CHAMPION, reason + was, gate, value))
    return client.get_model_version(name, version)


def list_models(name: str | None = None,
                client: MlflowClient | None = None) -> list[dict[str, Any]]:
    """One row per version: name, version, aliases, decision, metrics, run id, created.

    ``name`` None lists every registered model. Rows are sorted by name, then version.
    """
    client = client or registry_client()
    if name is None:
        names = sorted(m.name for m in client.search_registered_models())
    else:
        _require_model(client, name)
        names = [name]
    rows = []
    for model_name in names:
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(model_name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in client.search_model_versions(f"name = '{model_name}'"):
            tags = v.tags or {}
            rows.append({
                "name": model_name, "version": str(v.version),
                "aliases": sorted(aliases.get(str(v.version), [])),
                "decision": tags.get("decision"), "reason": tags.get("decision_reason"),
                "metrics": version_metrics(v), "run_id": v.run_id,
                "created": v.creation_timestamp, "data_digest": tags.get("data_digest"),
                "git_commit": tags.get("git_commit"),
            })
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def format_models(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_models` rows (for ``pilamim models``)."""
    if not rows:
        return "no registered model versions"
    keys = sorted({k for r in rows for k in r["metrics"]})
    header = ["name", "version", "aliases", *keys, "decision"]
    table = [header] + [
        [r["name"], str(r["version"]), ",".join(r["aliases"]) or "-",
         *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys),
         r["decision"] or "-"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


# ----------------------------------------------------------------------------- the step

# Version tags that say what a version is and what its numbers were measured on.
TAG_ENCODER_SHA = "encoder_sha256"
TAG_PROTOCOL = "eval_protocol"
TAG_DATA_DIGEST = "data_digest"
ABANDONED = "abandoned"


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


def read_register_inputs(rp: RegisterParams) -> RegisterInputs:
    """Metrics, encoder and data of one lineage, or a :class:`LineageError` naming the stage
    to rerun: the encoder must be pretrained on the prepared data, and every metrics file must
    have measured this encoder on this data."""
    files = read_metric_files(rp)
    metrics = read_eval_metrics(rp, files)
    spec = read_encoder_config(rp.encoder_dir)
    digest = data_lineage.read_data_digest(rp.data_dir)
    if digest is None:
        raise FileNotFoundError(f"{rp.data_dir}/dataset.json does not exist: register records "
                                f"which data a version was measured on; run `pilamim prepare`")
    if spec.get("dataset_digest") != digest:
        raise LineageError(
            f"the encoder in {rp.encoder_dir} was pretrained on data "
            f"{str(spec.get('dataset_digest'))[:12]} but {rp.data_dir} holds data {digest[:12]}; "
            f"rerun `pilamim pretrain` (then probe and finetune)")
    sha = encoder_sha256(rp.encoder_dir)
    gate_file = METRIC_SOURCES[rp.gate_metric][0]
    protocol = ""
    for attr, stage in sorted({(src[0], src[2]) for src in METRIC_SOURCES.values()}):
        if attr in files:
            lineage = check_metrics_lineage(getattr(rp, attr), files[attr], stage, digest, sha)
            protocol = lineage["protocol"] if attr == gate_file else protocol
    return RegisterInputs(metrics, digest, sha, protocol)


def register(params: Params) -> dict[str, Any]:
    """The whole register step from files; returns (and writes) the decision record.

    Inputs are checked before MLflow is touched, so a missing or mismatched file fails with
    what to run first and leaves no run behind. Logs into the active MLflow run if a stage
    wrapper opened one, else opens the ``register`` stage run itself.
    """
    inputs = read_register_inputs(params.register)
    if mlflow.active_run() is not None:
        active = mlflow.active_run()
        tags = active.data.tags
        return _register_in_run(params, inputs, active.info.run_id,
                                tags.get(tracking.TAG_PIPELINE_ID, ""))
    with tracking.stage_run("register", params, dataset_digest=inputs.data_digest) as run:
        return _register_in_run(params, inputs, run.run_id, run.pipeline_id)


def version_with_weights(client: MlflowClient, name: str, sha: str):
    """The version of ``name`` registered with these exact weights, or None."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        if _is_missing(err):
            return None
        raise
    same = [v for v in versions if (v.tags or {}).get(TAG_ENCODER_SHA) == sha]
    return min(same, key=lambda v: int(v.version)) if same else None


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


def mark_abandoned(client: MlflowClient, name: str, keep: str) -> list[str]:
    """Tag versions left without a decision by a killed ``register`` as abandoned.

    Only versions whose registering run has ended (a killed one is closed by
    :func:`pilamim.tracking.close_orphaned_runs`) are touched: a register still running
    elsewhere owns its version.
    """
    marked = []
    for v in client.search_model_versions(f"name = '{name}'"):
        if str(v.version) == keep or (v.tags or {}).get("decision"):
            continue
        try:
            running = client.get_run(v.run_id).info.status == "RUNNING" if v.run_id else False
        except MlflowException:
            running = False
        if running:
            continue
        client.set_model_version_tag(name, str(v.version), "decision", ABANDONED)
        client.set_model_version_tag(name, str(v.version), "decision_reason",
                                     "its `pilamim register` stopped before the gate ran; "
                                     f"version {keep} was registered after it")
        marked.append(str(v.version))
    return marked


def _register_in_run(params: Params, inputs: RegisterInputs, run_id: str,
                     pipeline_id: str) -> dict[str, Any]:
    """Log and register the encoder (or find its version: same weights, same version), gate
    it against the champion, record the decision."""
    rp = params.register
    client = MlflowClient()
    data_lineage.log_dataset_input(rp.data_dir, context="registration")
    mlflow.log_metrics(inputs.metrics)
    champion = get_alias(client, rp.model_name, CHAMPION)
    version = version_with_weights(client, rp.model_name, inputs.encoder_sha256)
    decided = version is not None and (version.tags or {}).get("decision") in (CHAMPION,
                                                                               CHALLENGER)
    if version is None:
        logged = log_encoder_model(rp.encoder_dir)
        commit, dirty = tracking.git_info()
        version = register_version(rp.model_name, logged.model_uri, {
            TAG_DATA_DIGEST: inputs.data_digest, TAG_ENCODER_SHA: inputs.encoder_sha256,
            TAG_PROTOCOL: inputs.protocol, "git_commit": commit,
            "git_dirty": str(dirty).lower(), "params_hash": tracking.params_hash(params),
            "pipeline_id": pipeline_id, "embedder_uri": logged.embedder_uri,
            **{f"{METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in inputs.metrics.items()},
        })
    else:  # same weights: this evaluation becomes the version's (protocols may have changed)
        refresh_evaluation(client, rp.model_name, str(version.version), inputs)
    abandoned = mark_abandoned(client, rp.model_name, keep=str(version.version))
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
    record = {
        "model_name": rp.model_name, "version": int(version.version),
        "model_uri": f"models:/{rp.model_name}/{version.version}",
        "logged_model_uri": version.source,
        "embedder_uri": (version.tags or {}).get("embedder_uri")
        or client.get_model_version(rp.model_name, str(version.version)).tags["embedder_uri"],
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

"""The MLflow Model Registry: versions, aliases and their tags.

What a registered version records (tags: its metrics as ``metric.<name>``, the data and weights
it was measured on, the gate's decision and reason) and the operations on them: create a
version, find the one holding an alias or these exact weights, apply a decision, promote by
hand, list. The register stage (:mod:`pilamim.stages.register`) uses them; so do
``pilamim promote NAME VERSION`` and ``pilamim models``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pilamim.registry.promotion import CHALLENGER, CHAMPION, Decision
from pilamim.tracking import owners, server

METRIC_TAG_PREFIX = "metric."
# Version tags that say what a version is and what its numbers were measured on.
TAG_ENCODER_SHA = "encoder_sha256"
TAG_PROTOCOL = "eval_protocol"
TAG_DATA_DIGEST = "data_digest"
# Versions registered before the model was pickle-free: the URI of their pickled PyTorch-flavour
# model (no longer logged).
TAG_ENCODER_URI = "encoder_uri"
ABANDONED = "abandoned"


class RegistryError(LookupError):
    """A registry lookup a user asked for failed; the message lists what exists."""


def registry_client() -> MlflowClient:
    """A client on the resolved tracking URI, for read/alias operations by humans.

    Fails fast if an http server is down, and refuses to create an empty local store: a
    missing ``mlflow.db`` means nothing was registered yet.
    """
    uri = server.resolve_tracking_uri()
    server.check_tracking_reachable(uri)
    db = server.sqlite_path(uri)
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
    """Point alias ``decision.action`` at ``version``; record decision + reason as its tags.

    The ``decision`` tag is written last: it tells registers waiting in turn
    (:func:`await_turn`) that this version's alias move is done.
    """
    version = str(version)
    client.set_registered_model_alias(name, decision.action, version)
    client.set_model_version_tag(name, version, "decision_reason", decision.reason)
    client.set_model_version_tag(name, version, "gate_metric", decision.gate_metric)
    client.set_model_version_tag(name, version, "decision", decision.action)


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
    if CHALLENGER in (current.aliases or []):  # one version, one role
        client.delete_registered_model_alias(name, CHALLENGER)
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


class RegistryBusy(TimeoutError):
    """An earlier version's register did not reach its gate decision in time."""


def await_turn(client: MlflowClient, name: str, version: str | int, timeout_s: float,
               poll_s: float = 0.5) -> list[str]:
    """Wait until every version numbered below ``version`` has a gate decision; returns the
    versions marked abandoned on the way.

    The registry numbers versions in the order they are created, so deciding in that order
    makes concurrent registers (several workers against one tracking server, whatever the
    entrance) act as if they ran one after the other: each reads the champion only after the
    one before it has moved the alias, and ``@champion`` cannot end on a worse version because
    two registers read the same old champion. The wait is short, as model logging happens
    before a version exists; only the read, the decision and the alias move are in turn.

    A version without a decision whose registering run has ended (a killed ``register``: its
    run is closed by :func:`pilamim.tracking.owners.close_orphaned_runs`) is tagged abandoned
    and no longer waited for; so is one with no run. A register still running elsewhere is
    waited for up to ``timeout_s``, then :class:`RegistryBusy` names it.
    """
    mine = int(version)
    deadline = time.monotonic() + timeout_s
    abandoned: list[str] = []
    while True:
        pending = []
        for v in client.search_model_versions(f"name = '{name}'"):
            if int(v.version) == mine or (v.tags or {}).get("decision"):
                continue
            if not _register_running(client, v.run_id):
                _mark_abandoned(client, name, str(v.version), keep=str(mine))
                abandoned.append(str(v.version))
            elif int(v.version) < mine:
                pending.append(v)
        if not pending:
            return sorted(abandoned, key=int)
        if time.monotonic() > deadline:
            first = min(pending, key=lambda v: int(v.version))
            raise RegistryBusy(
                f"version {first.version} of {name!r} has waited for its promotion gate for "
                f"over {timeout_s:.0f} s (its register run {first.run_id} is still RUNNING), "
                f"and version {mine} decides after it. If that register died, end its run "
                f"(MLflow UI, or `mlflow runs` / MlflowClient().set_terminated) and rerun "
                f"`pilamim register`: the version is kept and gated then; or raise "
                f"register.turn_timeout_s")
        time.sleep(poll_s)


def _register_running(client: MlflowClient, run_id: str | None) -> bool:
    """Whether a version's registering run may still decide it: RUNNING, and not owned by a
    process of this host that is gone (:func:`pilamim.tracking.owners.owner_alive`)."""
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    owner = run.data.tags.get(owners.TAG_OWNER)
    return run.info.status == "RUNNING" and (owner is None or owners.owner_alive(owner))


def _mark_abandoned(client: MlflowClient, name: str, version: str, keep: str) -> None:
    client.set_model_version_tag(name, version, "decision_reason",
                                 "its `pilamim register` stopped before the gate ran "
                                 f"(found by the register of version {keep})")
    client.set_model_version_tag(name, version, "decision", ABANDONED)

"""The flow's run summary: the dict it returns and the markdown artifact it publishes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pilamim.stages import STAGES, TABLE, Metric

ARTIFACT_KEY = "pilamim-pipeline-summary"
# The stage whose result is the promotion decision (the stage table says which writes the
# Model Registry).
REGISTERING = next(s.name for s in TABLE if s.writes_registry)
# (stage, metric) of the summary's metrics table, as the stage table lists them.
SUMMARY_METRICS: tuple[tuple[str, Metric], ...] = tuple(
    (s.name, m) for s in TABLE for m in s.metrics if m.summary)


def _link(run_id: str | None, experiment_id: str) -> str:
    if not run_id:
        return "–"
    from pilamim.tracking import runs

    url = runs.run_url(SimpleNamespace(run_id=run_id, experiment_id=experiment_id))
    return f"[`{run_id[:8]}`]({url})" if url else f"`{run_id}`"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def summarize(outcomes: dict[str, dict[str, Any]], pipeline: Any,
              status: str = "completed", error: str | None = None) -> dict[str, Any]:
    """The flow's return value: stages ran/skipped, headline metrics, promotion, MLflow ids."""
    metrics = {m.name: outcomes[stage]["metrics"].get(m.key)
               for stage, m in SUMMARY_METRICS if stage in outcomes}
    register = outcomes.get(REGISTERING, {}).get("metrics", {})
    return {
        "status": status,
        "error": error,
        "flow_run_id": str(flow_run.get_id() or ""),
        "pipeline_run_id": pipeline.run_id,
        "pipeline_id": pipeline.pipeline_id,
        "experiment_id": pipeline.experiment_id,
        "ran": [s for s in STAGES if s in outcomes and not outcomes[s]["skipped"]],
        "skipped": [s for s in STAGES if s in outcomes and outcomes[s]["skipped"]],
        "stages": " ".join(f"{s}={'skipped' if o['skipped'] else 'ran'}"
                           for s, o in outcomes.items()),
        "mlflow_runs": {s: o["mlflow_run_id"] for s, o in outcomes.items() if o["mlflow_run_id"]},
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "model_name": register.get("model_name"),
        "model_version": register.get("version"),
        "decision": register.get("action"),
        "decision_reason": register.get("reason"),
        "artifact_key": ARTIFACT_KEY,
    }


def summary_markdown(summary: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> str:
    """The markdown artifact: what ran, what it measured, what the gate decided, where to look."""
    from pilamim.tracking import server

    exp = summary["experiment_id"]
    lines = [f"# PiLaMIM pipeline: {summary['status']}", ""]
    if summary["error"]:
        lines += [f"**Error:** {summary['error']}", ""]
    uri = server.resolve_tracking_uri()
    lines += [f"MLflow pipeline run: {_link(summary['pipeline_run_id'], exp)} "
              f"(experiment `{exp}`, tracking `{uri}`)."]
    if not uri.startswith(("http://", "https://")):
        lines += ["", f"Open it with `mlflow ui --backend-store-uri {uri}`."]
    lines += ["", "## Stages", "", "| stage | status | MLflow run | seconds |",
              "|---|---|---|---|"]
    for stage in STAGES:
        o = outcomes.get(stage)
        if o is None:
            lines.append(f"| {stage} | not run | – | – |")
            continue
        status = "skipped (up to date in dvc.lock)" if o["skipped"] else "ran"
        seconds = "–" if o["skipped"] else f"{o['seconds']:.1f}"
        lines.append(f"| {stage} | {status} | {_link(o['mlflow_run_id'], exp)} | {seconds} |")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    for stage, m in SUMMARY_METRICS:
        value = outcomes.get(stage, {}).get("metrics", {}).get(m.key)
        lines.append(f"| {m.label} | {_fmt(value)} |")
    lines += ["", "## Promotion", ""]
    if summary["decision"]:
        register = outcomes[REGISTERING]
        when = " (earlier run; register was up to date)" if register["skipped"] else ""
        lines.append(f"`{summary['model_name']}` version {summary['model_version']} -> "
                     f"**@{summary['decision']}**{when}: {summary['decision_reason']}")
    else:
        lines.append("No registration recorded.")
    return "\n".join(lines) + "\n"


def publish(summary: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
    create_markdown_artifact(markdown=summary_markdown(summary, outcomes), key=ARTIFACT_KEY,
                             description="PiLaMIM pipeline: stages, metrics, promotion decision")

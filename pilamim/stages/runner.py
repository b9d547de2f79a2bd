"""Run one stage: check its inputs, open its MLflow run, call it, record what it produced.

This is the single entrance the CLI (hence DVC) and the Prefect flow share, so a stage
behaves and is tracked the same way whoever starts it.

Layers: the runner imports :mod:`pilamim.tracking` (MLflow) only inside :func:`_execute`, when a
run is tracked, and tracking does not import the runner; neither imports Prefect. Whoever
orchestrates (the Prefect flow) hands its own ids in as ``extra_tags``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from pilamim.checkout_lock import hold_checkout
from pilamim.config import Params
from pilamim.stages import STAGE_GROUPS, STAGES

# Stages whose work is itself a write to MLflow (register creates Model Registry versions):
# "untracked" cannot be honoured for them, so it is refused instead of silently ignored.
TRACKING_ONLY = frozenset({"register"})


class MissingInputError(FileNotFoundError):
    """A stage was started before the stage that makes its inputs."""


class TrackingRequiredError(ValueError):
    """An untracked run was asked of a stage that writes to MLflow (:data:`TRACKING_ONLY`)."""


def check_untracked_allowed(stage: str) -> None:
    """Refuse an untracked run of a :data:`TRACKING_ONLY` stage, before anything is written.

    ``--no-track`` promises no MLflow writes at all, and register's output *is* a Model
    Registry version: running it anyway would break that promise, and skipping the write would
    report success for a registration that never happened.
    """
    if stage in TRACKING_ONLY:
        raise TrackingRequiredError(f"{stage} writes to the MLflow Model Registry; it cannot "
                                    f"run with --no-track")


def stage_module(stage: str) -> ModuleType:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    return importlib.import_module(f"pilamim.stages.{stage}")


def check_inputs(stage: str, params: Params) -> None:
    for path, maker in stage_module(stage).inputs(params).items():
        if not Path(path).exists():
            raise MissingInputError(f"`pilamim {stage}` needs {path}, which does not exist: "
                                    f"run `pilamim {maker}` first")


def scalars(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric top-level values of a stage result, as MLflow metrics."""
    return {f"{prefix}/{k}": float(v) for k, v in result.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def execute(stage: str, params: Params, *, track: bool = True,
            extra_tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run ``stage``; with ``track`` (the default) inside its own MLflow run.

    Under torchrun only rank 0 records: one stage run per job, not one per process.
    ``extra_tags`` go on the stage run (the Prefect flow's run ids: tracking does not ask
    Prefect). ``track=False`` for a :data:`TRACKING_ONLY` stage raises
    :class:`TrackingRequiredError` before the checkout is taken.
    Every entrance comes through here, so here the stage holds the checkout
    (:mod:`pilamim.checkout_lock`): a second run in the same working directory is refused
    instead of overwriting this one's outputs; the flow's own calls and processes pass.
    """
    if not track:
        check_untracked_allowed(stage)
    with hold_checkout():
        return _execute(stage, params, track=track, extra_tags=extra_tags)


def _execute(stage: str, params: Params, *, track: bool,
             extra_tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    module = stage_module(stage)
    check_inputs(stage, params)
    if not track or int(os.environ.get("RANK", "0")) != 0:
        return module.run(params, None)

    from pilamim import data_lineage, tracking  # MLflow is a heavy import: only when tracking

    data_dir = module.data_dir(params)
    # prepare makes the data set: the digest on disk before it runs is the old one
    digest = data_lineage.read_data_digest(data_dir) if data_dir and stage != "prepare" else None
    with tracking.stage_run(stage, params, groups=STAGE_GROUPS[stage],
                            dataset_digest=digest, extra_tags=extra_tags) as run:
        if digest:
            data_lineage.log_dataset_input(data_dir)
        result = module.run(params, run.logger)
        if stage == "prepare":  # its output is the data set: record it as this run's input
            run.set_tags({tracking.TAG_DATA_DIGEST: result["digest"]})
            data_lineage.log_dataset_input(data_dir, context="prepare")
        run.log_metrics(scalars(result, stage))
    result["mlflow_run_id"] = run.run_id
    return result

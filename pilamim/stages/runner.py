"""Run one stage: check its inputs, open its MLflow run, call it, record what it produced.

This is the single entrance of every stage: the CLI calls it, so DVC does, and so does the
Prefect flow, which has DVC run the stage commands. A stage behaves and is tracked the same way
whoever starts it.

What to check, log and refuse comes from the stage table (:mod:`pilamim.stages`), so nothing here
names a particular stage. Layers: the runner imports :mod:`pilamim.tracking` (MLflow) only inside
:func:`_execute`, when a run is tracked, and tracking does not import the runner; neither imports
Prefect. Whoever orchestrates hands its own ids down: in env ``PILAMIM_RUN_TAGS`` to a stage
command (the Prefect flow does), or as ``extra_tags`` to a call in its own process.
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
from pilamim.stages import stage as stage_spec


class MissingInputError(FileNotFoundError):
    """A stage was started before the stage that makes its inputs."""


class TrackingRequiredError(ValueError):
    """An untracked run was asked of a stage that writes to MLflow (``writes_registry``)."""


def check_untracked_allowed(stage: str) -> None:
    """Refuse an untracked run of a ``writes_registry`` stage, before anything is written.

    ``--no-track`` promises no MLflow writes at all, and register's output *is* a Model
    Registry version: running it anyway would break that promise, and skipping the write would
    report success for a registration that never happened.
    """
    if stage_spec(stage).writes_registry:
        raise TrackingRequiredError(f"{stage} writes to the MLflow Model Registry; it cannot "
                                    f"run with --no-track")


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(stage_spec(stage).module)


def check_inputs(stage: str, params: Params) -> None:
    for path, maker in stage_spec(stage).input_paths(params).items():
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
    Prefect). ``track=False`` for a ``writes_registry`` stage raises
    :class:`TrackingRequiredError` before the checkout is taken.
    Every entrance comes through here, so here the stage holds the checkout
    (:mod:`pilamim.checkout_lock`): a second run in the same working directory is refused
    instead of overwriting this one's outputs; the processes of the run that holds it (the
    stage commands the flow has DVC start) join it.
    """
    if not track:
        check_untracked_allowed(stage)
    with hold_checkout():
        return _execute(stage, params, track=track, extra_tags=extra_tags)


def _execute(stage: str, params: Params, *, track: bool,
             extra_tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    spec, module = stage_spec(stage), stage_module(stage)
    check_inputs(stage, params)
    if not track or int(os.environ.get("RANK", "0")) != 0:
        return module.run(params, None)

    from pilamim.tracking import datasets, runs  # MLflow is a heavy import: only when tracking

    data_dir = spec.data_dir(params)
    # a stage that makes the data set finds the old one on disk before it runs
    digest = datasets.read_data_digest(data_dir) if data_dir and not spec.makes_data else None
    with runs.stage_run(stage, params, groups=spec.groups, dataset_digest=digest,
                        extra_tags=extra_tags) as run:
        if digest:
            datasets.log_dataset_input(data_dir)
        result = module.run(params, run.logger)
        if spec.makes_data:  # its output is the data set: record it as this run's input
            run.set_tags({runs.TAG_DATA_DIGEST: result["digest"]})
            datasets.log_dataset_input(data_dir, context=stage)
        run.log_metrics(scalars(result, stage))
    result["mlflow_run_id"] = run.run_id
    return result

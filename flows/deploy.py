"""Run ``pilamim-pipeline`` on a schedule: serve it from this process, or deploy it to a pool.

Both create the deployment ``pilamim-pipeline/nightly`` (cron ``0 2 * * *`` UTC, at most one
run at a time — two trainings in one workspace would fight over its files), with the flow's
parameters (the pydantic ``Params``) validated by the Prefect API. ``prefect.yaml`` at the
repository root declares the same deployment for ``prefect deploy``. Run everything from the
repository root: the flow reads ``params/`` and writes ``data/``, ``models/``, ``metrics/`` there.

1. Start a Prefect server (UI at http://127.0.0.1:4200) and point clients at it::

       prefect server start --host 127.0.0.1 --port 4200
       prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api

2. Either **serve** (one long-running process that both schedules and runs the flow)::

       python -m pilamim_flows.deploy                     # Ctrl-C stops it and pauses the schedule

   or **deploy to a process work pool** (a worker runs each flow run in a subprocess)::

       prefect work-pool create --type process pilamim-process
       prefect deploy --name nightly              # reads prefect.yaml
       #   or: python -m pilamim_flows.deploy --pool pilamim-process
       prefect worker start --pool pilamim-process

3. Trigger a run now instead of waiting for the schedule::

       prefect deployment run pilamim-pipeline/nightly
       prefect deployment run pilamim-pipeline/nightly --param force=true

Scheduled runs stay "Late" until a served process or a worker picks them up.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pilamim_flows.pipeline import FLOW_NAME, pilamim_pipeline
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/pipeline.py:pilamim_pipeline"
DEPLOYMENT_NAME = "nightly"
WORK_POOL = "pilamim-process"
CRON = "0 2 * * *"
TIMEZONE = "UTC"
TAGS = ["pilamim", "training"]
DESCRIPTION = ("PiLaMIM: fetch -> prepare -> pretrain -> probe + finetune -> register; stages "
               "DVC reports up to date are skipped.")


def concurrency() -> ConcurrencyLimitConfig:
    """One run at a time; a run triggered meanwhile waits for it (nothing is dropped)."""
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def serve(name: str = DEPLOYMENT_NAME, cron: str = CRON, timezone: str = TIMEZONE,
          pause_on_shutdown: bool = True) -> None:
    """Create the deployment and run its flow runs from this process until interrupted.

    The schedule is paused when this process stops (Prefect's default): otherwise runs pile
    up as "Late" with nobody to run them. ``pause_on_shutdown=False`` keeps it active.
    """
    pilamim_pipeline.serve(name=name, schedule=Cron(cron, timezone=timezone),
                           global_limit=concurrency(), tags=TAGS, description=DESCRIPTION,
                           pause_on_shutdown=pause_on_shutdown, limit=1)


def deploy(pool: str = WORK_POOL, name: str = DEPLOYMENT_NAME, cron: str = CRON,
           timezone: str = TIMEZONE) -> str:
    """Register the deployment on a ``process`` work pool; a worker in this folder runs it.

    The flow is loaded from this checkout (``from_source(REPO_ROOT)``): no image, no push.
    Returns the deployment id.
    """
    source = pilamim_pipeline.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    deployment_id = source.deploy(name=name, work_pool_name=pool,
                                  schedule=Cron(cron, timezone=timezone),
                                  concurrency_limit=concurrency(), tags=TAGS,
                                  description=DESCRIPTION, print_next_steps=False)
    print(f"deployment {FLOW_NAME}/{name} ({deployment_id}) on work pool {pool!r}; start a "
          f"worker with: prefect worker start --pool {pool}")
    return str(deployment_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilamim_flows.deploy",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pool", metavar="NAME",
                        help=f"deploy to this process work pool (e.g. {WORK_POOL}) instead of "
                        "serving from this process")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    parser.add_argument("--cron", default=CRON, help=f"schedule (default {CRON!r})")
    parser.add_argument("--timezone", default=TIMEZONE, help="timezone of the cron schedule")
    parser.add_argument("--keep-schedule", action="store_true",
                        help="serve: leave the schedule active when this process stops")
    args = parser.parse_args(argv)
    if args.pool:
        deploy(args.pool, args.name, args.cron, args.timezone)
    else:
        serve(args.name, args.cron, args.timezone, pause_on_shutdown=not args.keep_schedule)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which process owns an MLflow run, so runs of killed processes do not stay RUNNING forever.

A SIGKILLed stage never reaches ``end_run``: MLflow shows its run as RUNNING for ever, and
a registry version it created has no decision. Every run we open is tagged with its owner
(host, pid, process start time); before opening a new run, runs whose owner on this host is
gone are ended as KILLED. Runs owned by other hosts are left alone: their liveness cannot be
known from here. The start time guards against a recycled pid.
"""

from __future__ import annotations

import logging
import os
import socket

import psutil
from mlflow.tracking import MlflowClient

TAG_OWNER = "pilamim.owner"
log = logging.getLogger(__name__)


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def owner_tag() -> str:
    """``host:pid:start`` of this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid):.2f}"


def owner_alive(tag: str) -> bool:
    """False only when the owner ran on this host and is certainly gone."""
    host, _, rest = tag.partition(":")
    pid_text, _, start_text = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    started = _start_time(int(pid_text))
    return started is not None and f"{started:.2f}" == start_text


def close_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of ``experiment_id`` whose owning process is gone."""
    closed = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=200)
    for run in runs:
        tag = run.data.tags.get(TAG_OWNER)
        if tag and not owner_alive(tag):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("ended %d MLflow run(s) left RUNNING by killed processes as KILLED: %s",
                    len(closed), ", ".join(closed))
    return closed

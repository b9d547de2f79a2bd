"""Pretraining on many GPUs and nodes from a Prefect deployment: the flow starts torchrun.

A work pool whose container command is ``torchrun`` itself never starts Prefect's flow engine,
so the flow run stays Pending even when training succeeds. Here the pool runs the ordinary
flow-run command and this flow launches ``torchrun ... -m pilamim.cli pretrain`` as a child
process: its output goes to the flow's log and its exit status decides the run's state. One
flow run per node; runs of one job share ``rdzv_id`` and ``rdzv_endpoint``.

Only global rank 0 writes ``metrics/pretrain.json``, and torchrun decides at rendezvous which
node gets it. The ranks write where they ran into a folder this flow names
(:func:`pilamim.train.distributed.report_placement`): the flow run of the node that held rank 0
returns pretraining's metrics; the others return which ranks they ran and ``metrics: None``,
and never a metrics file an earlier run left on their disk.

    prefect deployment run pilamim-pretrain-distributed/pretrain-gpu              # 1 node
    prefect deployment run pilamim-pretrain-distributed/pretrain-gpu \\
        --param nnodes=2 --param rdzv_endpoint=node0:29400 --param rdzv_id=job-17  # per node

Not named ``distributed.py``: Prefect puts an entrypoint's folder on ``sys.path``, and a module of
that name there shadowed Dask's ``distributed`` package in every process spawned afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pilamim.params_files import load_params

FLOW_NAME = "pilamim-pretrain-distributed"


def torchrun_command(nproc_per_node: str = "gpu", nnodes: str = "1",
                     rdzv_endpoint: str = "localhost:29400", rdzv_id: str = "pilamim",
                     params_dir: str = "params", overrides: list[str] | None = None) -> list[str]:
    """The launcher line: torchrun from this interpreter, c10d rendezvous, our pretrain stage."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
           "-m", "pilamim.cli", "pretrain", "--params", params_dir]
    for item in overrides or []:
        cmd += ["--set", item]
    return cmd


@flow(name=FLOW_NAME)
def pretrain_distributed(nproc_per_node: str = "gpu", nnodes: str = "1",
                         rdzv_endpoint: str = "localhost:29400", rdzv_id: str = "pilamim",
                         params_dir: str = "params",
                         overrides: list[str] | None = None) -> dict[str, Any]:
    """Run ``pilamim pretrain`` under torchrun on this node.

    Args:
        nproc_per_node: processes on this node: an integer, or ``gpu`` for one per GPU.
        nnodes: number of nodes (``MIN:MAX`` for elastic jobs); one flow run per node.
        rdzv_endpoint: ``HOST:PORT`` every node reaches (the first node's address).
        rdzv_id: the same value on every node of one job.
        params_dir: folder of the params files, relative to the working directory.
        overrides: ``group.key=value`` items, as ``pilamim pretrain --set`` takes them.

    Returns:
        On the node that held global rank 0, pretraining's metrics (``metrics/pretrain.json``).
        On any other node ``{"node_rank", "ranks", "world_size", "metrics": None,
        "metrics_written_by"}``: that node has no metrics of this run to return.
    """
    params = load_params(params_dir, overrides or [])  # a typo fails here, before torchrun
    cmd = torchrun_command(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, params_dir,
                           overrides)
    with tempfile.TemporaryDirectory(prefix="pilamim-placement-") as placement_dir:
        run_torchrun(cmd, placement_dir)
        ranks = placement(placement_dir)
    return node_result(ranks, Path(params.pretrain.metrics_path))


def run_torchrun(cmd: list[str], placement_dir: str) -> None:
    """Run ``cmd`` with its output in the flow's log; its ranks report into ``placement_dir``.

    Raises RuntimeError when torchrun fails, so the flow run ends Failed.
    """
    from pilamim.train.distributed import ENV_PLACEMENT_DIR  # torch: only once a run starts

    logger = get_run_logger()
    logger.info("launching: %s", " ".join(cmd))
    env = {**os.environ, ENV_PLACEMENT_DIR: placement_dir}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=env) as proc:
        for line in proc.stdout:
            if line.strip():
                logger.info(line.rstrip()[-2000:])
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode}; the lines above are "
                           "its output. A rerun resumes from the last checkpoint.")


def placement(placement_dir: str | Path) -> dict[str, Any]:
    """Where the ranks of this node ran, from their reports: ``node_rank``, the global
    ``ranks`` and ``world_size``. After elastic restarts only the last attempt counts.

    Raises RuntimeError when no rank reported (torchrun ran something that is not our stage).
    """
    reports = [json.loads(f.read_text()) for f in sorted(Path(placement_dir).glob("rank-*.json"))]
    if not reports:
        raise RuntimeError(f"torchrun succeeded but no rank reported where it ran in "
                           f"{placement_dir}; cannot tell whether this node held global rank 0")
    last = max(r["restart_count"] for r in reports)
    reports = [r for r in reports if r["restart_count"] == last]
    return {"node_rank": reports[0]["node_rank"], "ranks": sorted(r["rank"] for r in reports),
            "world_size": reports[0]["world_size"]}


def node_result(ranks: dict[str, Any], metrics_path: Path) -> dict[str, Any]:
    """What this node's flow run returns: pretraining's metrics where global rank 0 ran (it
    wrote them in this run), else where it ran and ``metrics: None``: a metrics file on this
    node then is an earlier run's (or, on a shared disk, the other node's), not this node's."""
    logger = get_run_logger()
    if 0 in ranks["ranks"]:
        logger.info("global rank 0 ran on this node (node rank %s): returning %s",
                    ranks["node_rank"], metrics_path)
        return json.loads(metrics_path.read_text())
    logger.info("this node (node rank %s) ran global ranks %s of %s; global rank 0 ran on "
                "another node and wrote the metrics there", ranks["node_rank"], ranks["ranks"],
                ranks["world_size"])
    return {**ranks, "metrics": None,
            "metrics_written_by": "the node that held global rank 0; its flow run returns them"}

"""Pretraining on many GPUs and nodes from a Prefect deployment: the flow starts torchrun.

A work pool whose container command is ``torchrun`` itself never starts Prefect's flow engine,
so the flow run stays Pending even when training succeeds. Here the pool runs the ordinary
flow-run command and this flow launches ``torchrun ... -m pilamim.cli pretrain`` as a child
process: its output goes to the flow's log, its exit status decides the run's state, and the
run returns pretraining's metrics. One flow run per node; runs of one job share ``rdzv_id``
and ``rdzv_endpoint``.

    prefect deployment run pilamim-pretrain-distributed/pretrain-gpu              # 1 node
    prefect deployment run pilamim-pretrain-distributed/pretrain-gpu \\
        --param nnodes=2 --param rdzv_endpoint=node0:29400 --param rdzv_id=job-17  # per node
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    """
    params = load_params(params_dir, overrides or [])  # a typo fails here, before torchrun
    logger = get_run_logger()
    cmd = torchrun_command(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, params_dir,
                           overrides)
    logger.info("launching: %s", " ".join(cmd))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        for line in proc.stdout:
            if line.strip():
                logger.info(line.rstrip()[-2000:])
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode}; the lines above are "
                           "its output. A rerun resumes from the last checkpoint.")
    return json.loads(Path(params.pretrain.metrics_path).read_text())

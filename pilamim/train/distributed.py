"""DDP set-up from ``torchrun``'s environment; a plain single process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pilamim.io import atomic_write_json

# A folder named by whoever started torchrun (the Prefect flow): each rank says there where it ran.
ENV_PLACEMENT_DIR = "PILAMIM_PLACEMENT_DIR"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launch_rank() -> int:
    """This process's global rank as torchrun set it (0 when not launched by torchrun).

    Readable before the process group exists, so stage code can decide who writes files.
    """
    return int(os.environ.get("RANK", "0"))


def report_placement() -> Path | None:
    """Write ``rank-<RANK>.json`` (global, node and local rank, world size, restart count) into
    the folder ``PILAMIM_PLACEMENT_DIR`` names, if it names one; returns the file.

    torchrun hands out node ranks at rendezvous, and only the processes it starts see them (in
    their environment): the process that started torchrun cannot tell whether its node got
    global rank 0, the rank that writes the metrics. This file tells it.
    """
    folder = os.environ.get(ENV_PLACEMENT_DIR)
    if not folder:
        return None
    env = os.environ
    placement = {"rank": int(env.get("RANK", "0")), "node_rank": int(env.get("GROUP_RANK", "0")),
                 "local_rank": int(env.get("LOCAL_RANK", "0")),
                 "world_size": int(env.get("WORLD_SIZE", "1")),
                 "restart_count": int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))}
    return atomic_write_json(Path(folder) / f"rank-{placement['rank']}.json", placement)


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun described (nccl on CUDA, gloo on CPU), if any; first
    say where this rank runs, if asked (:func:`report_placement`)."""
    report_placement()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

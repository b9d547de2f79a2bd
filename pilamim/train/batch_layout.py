"""How a run's global batch is split over processes, and why that split is not part of its recipe.

A pretraining step means the same thing on 1 process with ``batch_size`` 256 as on 4 processes
with 64 each: the sampler deals the global order round-robin (:mod:`pilamim.train.sampler`), the
mask noise is one global draw per micro-step whose rows follow the samples (``TrainStep.noise``),
and DDP averages the gradients. What defines the recipe is the global batch; how it is split is
bookkeeping. So a checkpoint written on N processes resumes on M processes when the global batch
is kept, e.g. a job killed on 8 GPUs continued on 4 with ``batch_size`` doubled. With the global
micro-batch (``batch_size x world``) kept too, the continuation draws the same masks and equals
the uninterrupted run up to float rounding; with ``accum_steps`` changed instead, it is the same
recipe on other mask draws.

Keeping the per-process ``batch_size`` while the process count changes changes the global batch
and so the recipe: such a run would quietly train a new checkpoint from step 0 beside the one it
was meant to continue, hours of compute later. :func:`world_change` finds that case so the loop
can stop with the fix instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# How the global batch is split: recorded in a checkpoint's meta, never compared.
LAYOUT = "layout"
_SPLIT_PARAMS = ("batch_size", "accum_steps")


class WorldSizeChangedError(RuntimeError):
    """A checkpoint of this recipe exists at another global batch only because the number of
    processes changed: continuing it needs the per-process batch scaled, not a new run."""


def layout(batch_size: int, accum_steps: int, world: int) -> dict[str, int]:
    return {"world": world, "batch_size": batch_size, "accum_steps": accum_steps}


def comparable(meta: dict[str, Any]) -> dict[str, Any]:
    """The meta that decides whether a checkpoint continues a run: without the layout, and
    without the split parameters that checkpoints written before the layout kept in the recipe."""
    recipe = {k: v for k, v in meta.get("recipe", {}).items() if k not in _SPLIT_PARAMS}
    return {**{k: v for k, v in meta.items() if k != LAYOUT}, "recipe": recipe}


def saved_layout(meta: dict[str, Any]) -> dict[str, int] | None:
    """The layout a checkpoint was written with; older checkpoints have it in their recipe."""
    if LAYOUT in meta:
        return meta[LAYOUT]
    recipe = meta.get("recipe", {})
    if not all(k in recipe for k in _SPLIT_PARAMS) or "global_batch" not in meta:
        return None
    per_world = recipe["batch_size"] * recipe["accum_steps"]
    return layout(recipe["batch_size"], recipe["accum_steps"], meta["global_batch"] // per_world)


def world_change(paths: list[Path], meta: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The first checkpoint among ``paths`` that this run would continue if it ran on the
    checkpoint's number of processes: only the global batch differs, and only because the
    world size did (same per-process ``batch_size`` and ``accum_steps``)."""
    mine = meta[LAYOUT]
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            saved_meta = state["meta"]
        except Exception:  # unreadable: find_resume names it when it is this run's own file
            continue
        theirs = saved_layout(saved_meta)
        if theirs is None or theirs["world"] == mine["world"]:
            continue
        same_split = all(theirs[k] == mine[k] for k in _SPLIT_PARAMS)
        if same_split and comparable({**saved_meta, "global_batch": meta["global_batch"]}) \
                == comparable(meta):
            return path, {**saved_meta, "step": int(state["step"])}
    return None


def world_change_message(path: Path, saved: dict[str, Any], meta: dict[str, Any]) -> str:
    """What happened and the two ways on: keep the global batch, or start over on purpose."""
    theirs, mine = saved_layout(saved), meta[LAYOUT]
    assert theirs is not None
    global_batch = saved["global_batch"]
    per_step = mine["world"] * mine["accum_steps"]
    fixes = []
    if global_batch % per_step == 0:
        fixes.append(f"pretrain.batch_size={global_batch // per_step}")
    per_micro = mine["world"] * mine["batch_size"]
    if global_batch % per_micro == 0:
        fixes.append(f"pretrain.accum_steps={global_batch // per_micro}")
    keep = (f"set {' or '.join(fixes)}" if fixes else
            f"choose pretrain.batch_size x accum_steps x {mine['world']} processes = "
            f"{global_batch}")
    return (
        f"{path} holds step {saved['step']} of this recipe, trained on {theirs['world']} "
        f"process(es) x batch_size {theirs['batch_size']} x accum_steps {theirs['accum_steps']} "
        f"= global batch {global_batch}; on {mine['world']} process(es) this run's global batch "
        f"would be {meta['global_batch']}, which is another recipe, and it would train from step "
        f"0 (nothing was trained or changed). To continue that checkpoint, keep its global "
        f"batch: {keep}. To train global batch {meta['global_batch']} from step 0 instead, move "
        f"that checkpoint out of the way (mv '{path}' '{path}.world{theirs['world']}') or "
        "delete it")

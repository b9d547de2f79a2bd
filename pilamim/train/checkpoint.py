"""Full-state checkpoints for exact resume, written atomically, one per recipe.

Only plain tensors and containers are stored, so ``torch.load(weights_only=True)`` reads them.

Why one checkpoint per recipe, and not one backup slot: a run of a changed recipe used to move
``checkpoint.pt`` to ``previous-checkpoint.pt`` before it trained. When that run then failed
(a NaN at step 3), going back to the good recipe started from step 0, and the next change
overwrote the only backup. Now nothing is moved until a run has finished:

* ``checkpoint.pt`` belongs to the recipe whose encoder was exported last (or to the first run
  while it trains). A rerun of that recipe resumes it, after a SIGKILL too; it is what DVC
  versions in ``models/pretrain`` (``persist: true``, so it survives ``dvc repro``).
* A run of any other recipe trains in ``checkpoint-<key>.pt`` beside it, ``<key>`` a hash of the
  meta that :func:`stale_reason` compares, and leaves ``checkpoint.pt`` alone. Only when that
  run has completed and exported its encoder does its checkpoint become ``checkpoint.pt``
  (:func:`stage_promotion`); the one it replaces moves to its own ``checkpoint-<key>.pt``. So a
  failed run changes nothing but its own file, and going back to a kept recipe resumes it.
* Each kept checkpoint is a full model and optimizer state, so at most :data:`KEPT_RECIPES`
  stay beside ``checkpoint.pt``; the least recently trained goes first.

Keying by recipe rather than "keep the old one until the new one saved once" is what makes
every recipe resumable (not only the last two) and needs no bookkeeping file: the name says
whose state it is.

``epochs`` is not part of the recipe (a run may be continued to more epochs), so a recipe's
checkpoint can have trained past a rerun's ``epochs``. :func:`find_resume` refuses it
(:class:`CheckpointAheadError`) rather than export it as the shorter run; a shorter run cannot
get a checkpoint of its own either: its key would be the longer run's. Each checkpoint also
stores the run's :class:`Schedule` (the lr it started with), so continuing to more epochs does
not re-resolve ``base_lr: auto`` from the new length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pilamim.io import OutputBatch, atomic_torch_save
from pilamim.train.batch_layout import comparable

CHECKPOINT = "checkpoint.pt"
# Other recipes' checkpoints kept beside checkpoint.pt (each a full model + optimizer state).
KEPT_RECIPES = 3
KEYED_GLOB = "checkpoint-*.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (torn copy, foreign file): the message says which."""


class CheckpointAheadError(RuntimeError):
    """This recipe's checkpoint has trained past the requested ``epochs``: there is nothing left
    to train, and exporting it would record a shorter run than the encoder had."""


@dataclass(frozen=True)
class Schedule:
    """The lr schedule a run trains under, fixed when it starts from step 0 and stored in each
    of its checkpoints, so a resume reads it back instead of resolving it again.

    ``base_lr: auto`` depends on the run's total steps (:mod:`pilamim.recipes`): resolved again
    on a resume to more epochs, it would change the peak lr of a run halfway through. So
    ``base_lr``, ``peak_lr`` and ``warmup_steps`` are the values resolved at the first start;
    ``started_epochs`` is the length they were resolved for (None: the checkpoint predates
    stored schedules), ``epochs`` the length the lr and EMA curves span now, and ``changes``
    each resume that changed it (``at_step``, ``from_epochs``, ``to_epochs``). How the curves
    follow a changed length: :func:`pilamim.train.loop.run_schedule`.
    """

    base_lr: float
    peak_lr: float
    warmup_steps: int
    started_epochs: int | None
    epochs: int
    changes: tuple[dict[str, int], ...] = ()

    def resized(self, epochs: int, at_step: int) -> Schedule:
        """This schedule continued at ``at_step`` to ``epochs`` (itself if that is its length):
        the lrs stay, the change is recorded."""
        if epochs == self.epochs:
            return self
        change = {"at_step": at_step, "from_epochs": self.epochs, "to_epochs": epochs}
        return dataclasses.replace(self, epochs=epochs, changes=(*self.changes, change))

    def to_state(self) -> dict[str, Any]:
        """Plain values only (``torch.load(weights_only=True)`` and JSON read them)."""
        state = dataclasses.asdict(self)
        state["changes"] = [dict(c) for c in self.changes]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Schedule:
        return cls(base_lr=float(state["base_lr"]), peak_lr=float(state["peak_lr"]),
                   warmup_steps=int(state["warmup_steps"]),
                   started_epochs=state["started_epochs"], epochs=int(state["epochs"]),
                   changes=tuple(dict(c) for c in state["changes"]))


def recipe_key(meta: dict[str, Any]) -> str:
    """A short stable hash of a run's meta: equal metas, equal keys (hence one file each)."""
    text = json.dumps(comparable(meta), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_checkpoint(out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Where a run of ``meta`` keeps its checkpoint while ``checkpoint.pt`` belongs to another."""
    return Path(out_dir) / f"checkpoint-{recipe_key(meta)}.pt"


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, mask_generator: torch.Generator, meta: dict[str, Any],
                    schedule: Schedule) -> Path:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "mask_generator": mask_generator.get_state(),
        "cpu_rng": torch.get_rng_state(),
        "meta": meta,
        "schedule": schedule.to_state(),
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, device: torch.device | str,
                    *, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint; an unreadable one is a :class:`CheckpointError` naming the file and
    the one thing to do (torch's own message names neither, and can run to many lines)."""
    try:
        state = torch.load(path, map_location="cpu" if mmap else device, weights_only=True,
                           mmap=mmap)
        if not isinstance(state, dict) or not {"step", "meta", "model"} <= state.keys():
            raise ValueError("not a pilamim checkpoint")
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read the checkpoint {path} ({type(err).__name__}: {first_line}): it is torn "
            "(a copy or download cut short?) or not a pilamim checkpoint. Delete that one file "
            f"to train this recipe from step 0 (rm '{path}'); the exported encoder, metrics and "
            "other checkpoints stay as they are") from err
    return state


def stale_reason(saved_meta: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot continue this run (model, data or recipe changed), else None.

    Only ``epochs`` and bookkeeping may change between a run and its resume (the number of
    processes too, at the same global batch: :mod:`pilamim.train.batch_layout`): a longer run
    continues from the checkpoint (one already past the new ``epochs`` is refused by
    :func:`find_resume`), anything else is a new experiment.
    """
    saved_meta, meta = comparable(saved_meta), comparable(meta)
    changed = [k for k in meta if saved_meta.get(k) != meta[k]]
    if not changed:
        return None
    return "; ".join(f"{k}: {saved_meta.get(k)!r} -> {meta[k]!r}" for k in changed)


@dataclass(frozen=True)
class Resume:
    """Where a run saves its checkpoints and what it continues from."""

    path: Path                      # this run's checkpoint file
    state: dict[str, Any] | None    # the state it continues from; None: from step 0
    other_reason: str | None        # why checkpoint.pt (left alone) cannot continue this run
    other_meta: dict[str, Any] | None  # that checkpoint's meta: its key once this run completes

    @property
    def step(self) -> int:
        return int(self.state["step"]) if self.state is not None else 0


def find_resume(out_dir: str | Path, meta: dict[str, Any], device: torch.device | str,
                *, epochs: int, steps_per_epoch: int, mmap: bool = False) -> Resume:
    """``checkpoint.pt`` if it is this recipe's, else this recipe's own kept checkpoint, else a
    fresh start: in ``checkpoint.pt`` when there is none, beside it when it belongs to another
    recipe (so that one is untouched until this run completes).

    A checkpoint of this recipe that has trained more than ``epochs`` is a
    :class:`CheckpointAheadError`, raised before anything is written.
    """
    out_dir = Path(out_dir)
    canonical = out_dir / CHECKPOINT
    other_reason = other_meta = None
    if canonical.exists():
        state = load_checkpoint(canonical, device, mmap=mmap)
        other_reason = stale_reason(state["meta"], meta)
        if other_reason is None:
            check_not_past_end(canonical, int(state["step"]), epochs, steps_per_epoch)
            return Resume(canonical, state, None, None)
        other_meta = state["meta"]
        del state  # on a GPU: free it before loading the next one
    own = recipe_checkpoint(out_dir, meta)
    if own.exists():
        state = load_checkpoint(own, device, mmap=mmap)
        if stale_reason(state["meta"], meta) is None:
            check_not_past_end(own, int(state["step"]), epochs, steps_per_epoch)
            return Resume(own, state, other_reason, other_meta)
    return Resume(own if canonical.exists() else canonical, None, other_reason, other_meta)


def check_not_past_end(path: Path, step: int, epochs: int, steps_per_epoch: int) -> None:
    """Refuse a checkpoint at ``step`` for a run of ``epochs``: past the end it is not that run
    (its encoder trained longer), and treating the shorter run as a recipe of its own cannot
    work (``epochs`` is not in the recipe key, so it would share the longer run's file). The
    message says what to do; the checkpoint and every output stay as they are."""
    total = epochs * steps_per_epoch
    if step <= total:
        return
    trained = (f"{step // steps_per_epoch}" if step % steps_per_epoch == 0
               else f"{step / steps_per_epoch:.2f}")
    raise CheckpointAheadError(
        f"{path} has trained {trained} {'epoch' if trained == '1' else 'epochs'} ({step} steps) "
        f"of this recipe, past the requested pretrain.epochs={epochs} ({total} steps); nothing "
        "was trained, exported or changed. To export or continue that run, set pretrain.epochs to "
        f"{-(-step // steps_per_epoch)} or more. To train {epochs} "
        f"{'epoch' if epochs == 1 else 'epochs'} from step 0 instead, move that checkpoint out "
        f"of the way (mv '{path}' '{path}.{step}-steps') or delete it, or change the recipe "
        "(e.g. pretrain.seed): a changed recipe trains in a checkpoint of its own")


def stage_promotion(resume: Resume, out_dir: str | Path, batch: OutputBatch) -> None:
    """Add to ``batch`` the renames that make this completed run's checkpoint ``checkpoint.pt``,
    filing the one it replaces under that one's own key (committed with the exported encoder,
    so ``checkpoint.pt`` and ``encoder.safetensors`` belong to the same recipe)."""
    canonical = Path(out_dir) / CHECKPOINT
    if resume.path == canonical:
        return
    if canonical.exists() and resume.other_meta is not None:
        os.utime(canonical)  # it was just in use: keep it before older ones when pruning
        batch.move(canonical, recipe_checkpoint(out_dir, resume.other_meta))
    batch.move(resume.path, canonical)


def prune_recipe_checkpoints(out_dir: str | Path, keep: int = KEPT_RECIPES,
                             protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep`` most recently written ``checkpoint-<key>.pt`` files, counting
    ``protect`` (the running recipe's, which may not exist yet) as one kept; returns the
    deleted paths."""
    kept = [p for p in Path(out_dir).glob(KEYED_GLOB) if p != protect]
    kept.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    room = max(keep - (protect is not None and protect.match(KEYED_GLOB)), 0)
    for path in kept[room:]:
        path.unlink(missing_ok=True)
    return kept[room:]

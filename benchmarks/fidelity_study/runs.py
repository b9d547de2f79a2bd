"""One run of the study: an entry (preset or floor) x a seed -> a results JSON.

Presets pretrain through ``pilamim.stages.pretrain.run`` (the code ``pilamim pretrain`` runs);
the random-init floor builds the same encoder and exports it untrained; the raw-pixel floor
has no encoder. All then go through :func:`protocols.evaluate`. A run whose results JSON
exists is not redone (a killed study continues where it stopped); a killed pretraining
resumes from its own checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pilamim.config import Params, identity_values
from pilamim.data.prepared import PreparedDataset
from pilamim.io import atomic_write_json
from pilamim.model import build_encoder, encoder_spec
from pilamim.model.export import export_encoder

from . import protocols
from .budgets import with_paths
from .lowlevel import EvalImages

PRESETS = ("pilamim", "pilamim_nocls", "mae", "latent")
FLOORS = ("random_init", "raw_pixels")
ENTRIES = PRESETS + FLOORS
# Fine-tuning costs more than all the other protocols together; the question it answers is
# whether pretraining pays over the untrained encoder, so those two are fine-tuned.
FINETUNED = ("pilamim", "random_init")
# Order of work: the entries the targets need first, every seed of one before the next, so an
# interrupted study (rerun the same command to resume) already answers the main question.
RUN_ORDER = ("pilamim", "random_init", "raw_pixels", "mae", "pilamim_nocls", "latent")
RUNS_DIR = "fidelity_runs"
TRACKED_GROUPS = ("data", "model", "pretrain", "probe", "finetune")


class StudyMismatch(RuntimeError):
    """An existing results JSON was made with other study params than the ones asked for."""


@dataclass
class Study:
    params: Params  # shared by every run (budget + overrides)
    budget: str
    work: Path  # models and prepared data
    out: Path  # report + results JSON
    prepared: PreparedDataset
    data: EvalImages
    device: torch.device
    command: str
    track: bool = True
    finetuned: tuple[str, ...] = FINETUNED  # entries that also get the fine-tune protocol

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.params)


def fingerprint(params: Params) -> str:
    """sha256 of the study params without folders/seeds: what makes results comparable (an
    option added later, at its neutral value, leaves it unchanged: results stay reusable)."""
    values = {g: {k: v for k, v in identity_values(g, getattr(params, g).model_dump(mode="json"))
                  .items() if not k.endswith(("_dir", "_path")) and k not in ("seed", "preset")}
              for g in TRACKED_GROUPS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def result_path(out: Path, entry: str, seed: int) -> Path:
    return out / RUNS_DIR / f"{entry}-seed{seed}.json"


def load_results(out: Path, fingerprint_: str) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every results JSON in ``out`` made with these study params, and the others' paths."""
    kept: list[dict[str, Any]] = []
    other: list[Path] = []
    for path in sorted((out / RUNS_DIR).glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("fingerprint") == fingerprint_:
            kept.append(result)
        else:
            other.append(path)
    return kept, other


def mismatched(out: Path, todo: list[tuple[int, str]], fingerprint_: str) -> list[Path]:
    """Results JSON of planned runs that were made with other study params."""
    paths = [result_path(out, entry, seed) for seed, entry in todo]
    return [p for p in paths
            if p.exists() and json.loads(p.read_text()).get("fingerprint") != fingerprint_]


def run(study: Study, entry: str, seed: int) -> dict[str, Any]:
    """Do (or reuse) one run; returns its results (``cached`` says whether it was reused)."""
    path = result_path(study.out, entry, seed)
    name = f"{entry}-seed{seed}"
    params = with_paths(study.params, study.work, name,
                        entry if entry in PRESETS else study.params.model.preset, seed)
    if path.exists():
        result = json.loads(path.read_text())
        if result.get("fingerprint") != study.fingerprint:
            raise StudyMismatch(
                f"{path} was made with other study params (fingerprint {result.get('fingerprint')}"
                f", now {study.fingerprint}); use another --out folder or delete it to redo it")
        with _tracked(study, params, name, entry, seed, cached=True) as child:
            _log_summary(child, result)
        return {**result, "cached": True}

    with _tracked(study, params, name, entry, seed, cached=False) as child:
        logger = child.logger if child is not None else None
        t0, c0 = time.perf_counter(), time.process_time()
        pretrain_summary: dict[str, Any] | None = None
        encoder_dir: Path | None = Path(params.pretrain.out_dir)
        if entry in PRESETS:
            from pilamim.stages import pretrain as pretrain_stage

            pretrain_summary = pretrain_stage.run(params, logger)
        elif entry == "random_init":
            _export_random_encoder(params, study.prepared, seed)
        else:
            encoder_dir = None
        pretrain_s, pretrain_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if encoder_dir is None:
            features = study.data.pixel_features()
        else:
            features = protocols.encoder_features(encoder_dir, study.data, params, study.device)
        details, seconds = protocols.evaluate(
            features, study.data, study.prepared, params, study.device, encoder_dir,
            logger, finetune=entry in study.finetuned)
        result = {
            "entry": entry, "seed": seed, "budget": study.budget,
            "fingerprint": study.fingerprint, "command": study.command,
            "metrics": protocols.headline(details), "details": details,
            "pretrain": _slim(pretrain_summary),
            "timing": {"pretrain_s": pretrain_s, "pretrain_cpu_s": pretrain_cpu_s, **seconds,
                       "total_s": time.perf_counter() - t0,
                       "cpu_s": time.process_time() - c0},
            "device": str(study.device), "torch_threads": torch.get_num_threads(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if child is not None:
            result["mlflow_run_id"] = child.run_id
        atomic_write_json(path, result)
        _log_summary(child, result)
        if child is not None:
            child.log_artifact(path)
    return {**result, "cached": False}


def _export_random_encoder(params: Params, prepared: PreparedDataset, seed: int) -> None:
    """The encoder every preset starts from, untrained, exported like a pretrained one."""
    torch.manual_seed(seed)
    encoder = build_encoder(params.model, prepared.channels)
    name, kwargs = encoder_spec(params.model, prepared.channels)
    export_encoder(encoder, name, kwargs, params.pretrain.out_dir,
                   extra={"mean": list(prepared.mean), "std": list(prepared.std),
                          "preset": "random_init", "dataset_digest": prepared.digest})


def _slim(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {k: v for k, v in summary.items() if isinstance(v, int | float | str)}


@contextlib.contextmanager
def _tracked(study: Study, params: Params, name: str, entry: str, seed: int,
             cached: bool) -> Iterator[Any]:
    """The run's MLflow child run under the study's parent (env set by ``pipeline_run``)."""
    if not study.track:
        yield None
        return
    from pilamim.tracking.runs import stage_run

    tags = {"fidelity.entry": entry, "fidelity.seed": seed, "fidelity.budget": study.budget,
            "fidelity.cached": str(cached).lower(), "fidelity.fingerprint": study.fingerprint}
    with stage_run(name, params, groups=TRACKED_GROUPS, extra_tags=tags,
                   dataset_digest=study.prepared.digest, log_system_metrics=not cached) as child:
        yield child


def _log_summary(child: Any, result: dict[str, Any]) -> None:
    if child is None:
        return
    metrics = {f"fidelity/{k}": v for k, v in result["metrics"].items() if v is not None}
    metrics.update({f"fidelity/{k}": v for k, v in result["timing"].items()})
    child.log_metrics(metrics)

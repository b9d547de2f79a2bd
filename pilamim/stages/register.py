"""Stage ``register``: log the encoder as an MLflow model, register one version, gate it.

:func:`register` reads the stage outputs from files, checks they belong to one lineage (same
data, same encoder), logs the encoder as one pickle-free MLflow model in the ``register`` run
(:mod:`pilamim.registry.model_logging`), registers one version and decides its alias:

* ``embedder`` — pyfunc (:mod:`pilamim.registry.embedder`, logged as a model from code: no
  pickle) taking raw ``uint8`` ``(N, H, W, C)`` images as PIL/numpy give them, normalising them
  itself, so ``mlflow models serve -m models:/<name>@champion`` serves images. It also holds
  ``encoder.safetensors`` + ``encoder.json``:
  :func:`pilamim.registry.model_logging.load_registered_encoder` gives the timm ``nn.Module``.

The promotion gate (:func:`pilamim.registry.promotion.decide_promotion`, pure) makes a version
``@champion`` when its gate metric clears ``floor`` and beats the current champion by at least
``min_improvement``; otherwise ``@challenger``. Decision and reason go to the version's tags and
to ``metrics/register.json``. Which metrics a version records, and from which file, is the stage
table's (:func:`pilamim.stages.registered_metrics`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pilamim.config import Params, RegisterParams
from pilamim.loggers import Logger
from pilamim.registry.model_logging import read_encoder_config
from pilamim.registry.registration import RegisterInputs, register_encoder
from pilamim.stages import registered_metrics
from pilamim.stages import stage as stage_spec
from pilamim.stages.lineage import LineageError, check_metrics_lineage, encoder_sha256
from pilamim.tracking import datasets, runs

# Metric name -> (RegisterParams field naming the file, key in it, stage that writes the file).
METRIC_SOURCES: dict[str, tuple[str, str, str]] = {
    name: (f"{stage}_metrics", key, stage) for name, (stage, key) in registered_metrics().items()}


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    return register(params)


def read_metric_files(rp: RegisterParams) -> dict[str, dict[str, Any]]:
    """The probe/finetune metrics files that exist, by their :class:`RegisterParams` field.

    The file holding the gate metric must exist ("run `pilamim probe` first"); the others are
    optional (a metric that is absent is just not recorded).
    """
    gate_file, _, gate_stage = METRIC_SOURCES[rp.gate_metric]
    gate_path = Path(getattr(rp, gate_file))
    if not gate_path.exists():
        raise FileNotFoundError(
            f"gate metric {rp.gate_metric!r} is read from {gate_path}, which does not exist — "
            f"run `pilamim {gate_stage}` first"
        )
    loaded: dict[str, dict[str, Any]] = {}
    for attr in {src[0] for src in METRIC_SOURCES.values()}:
        path = Path(getattr(rp, attr))
        if path.exists():
            loaded[attr] = json.loads(path.read_text())
    return loaded


def read_eval_metrics(rp: RegisterParams,
                      loaded: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """The metrics of :data:`METRIC_SOURCES` in the files (:func:`read_metric_files`, read
    here unless given). Values must be fractions."""
    gate_file, gate_key, gate_stage = METRIC_SOURCES[rp.gate_metric]
    gate_path = Path(getattr(rp, gate_file))
    loaded = read_metric_files(rp) if loaded is None else loaded
    metrics = {}
    for name, (attr, key, _) in METRIC_SOURCES.items():
        value = loaded.get(attr, {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[name] = float(value)
    if rp.gate_metric not in metrics:
        raise ValueError(f"{gate_path} has no numeric {gate_key!r} (gate metric "
                         f"{rp.gate_metric}); rerun `pilamim {gate_stage}`")
    if not 0.0 <= metrics[rp.gate_metric] <= 1.0:
        raise ValueError(f"{gate_path}: {gate_key}={metrics[rp.gate_metric]} is not a fraction "
                         f"in [0, 1]; floor/min_improvement in params/register.yaml assume one")
    return metrics


def read_register_inputs(rp: RegisterParams) -> RegisterInputs:
    """Metrics, encoder and data of one lineage, or a :class:`LineageError` naming the stage
    to rerun: the encoder must be pretrained on the prepared data, and every metrics file must
    have measured this encoder on this data."""
    files = read_metric_files(rp)
    metrics = read_eval_metrics(rp, files)
    spec = read_encoder_config(rp.encoder_dir)
    digest = datasets.read_data_digest(rp.data_dir)
    if digest is None:
        raise FileNotFoundError(f"{rp.data_dir}/dataset.json does not exist: register records "
                                f"which data a version was measured on; run `pilamim prepare`")
    if spec.get("dataset_digest") != digest:
        raise LineageError(
            f"the encoder in {rp.encoder_dir} was pretrained on data "
            f"{str(spec.get('dataset_digest'))[:12]} but {rp.data_dir} holds data {digest[:12]}; "
            f"rerun `pilamim pretrain` (then probe and finetune)")
    sha = encoder_sha256(rp.encoder_dir)
    gate_file = METRIC_SOURCES[rp.gate_metric][0]
    protocol = ""
    for attr, stage in sorted({(src[0], src[2]) for src in METRIC_SOURCES.values()}):
        if attr in files:
            lineage = check_metrics_lineage(getattr(rp, attr), files[attr], stage, digest, sha)
            protocol = lineage["protocol"] if attr == gate_file else protocol
    return RegisterInputs(metrics, digest, sha, protocol)


def register(params: Params) -> dict[str, Any]:
    """The whole register step from files; returns (and writes) the decision record.

    Inputs are checked before MLflow is touched, so a missing or mismatched file fails with
    what to run first and leaves no run behind. Logs into the active MLflow run if a stage
    wrapper opened one, else opens the ``register`` stage run itself.
    """
    inputs = read_register_inputs(params.register)
    active = runs.active_run_ids()
    if active is not None:
        return register_encoder(params, inputs, *active)
    with runs.stage_run("register", params, groups=stage_spec("register").groups,
                        dataset_digest=inputs.data_digest) as run:
        return register_encoder(params, inputs, run.run_id, run.pipeline_id)

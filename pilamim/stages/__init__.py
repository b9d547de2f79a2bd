"""The stage table: every fact about a stage, in one place, for every entrance to read.

One :class:`Stage` per stage names its params groups, the files it needs (and which stage makes
each), what it writes, its metrics and the module it runs (``pilamim.stages.<name>``, whose
``run(params, logger) -> dict`` is the stage). From this table:

* the CLI builds one command per stage (:mod:`pilamim.cli`), and the runner checks inputs, opens
  the MLflow run named after the stage and logs its params groups (:mod:`pilamim.stages.runner`);
* the Prefect flow takes its order and concurrency (:func:`waves`) and the summary and the
  promotion gate their metric names (:data:`Metric.name`);
* ``dvc.yaml`` is checked against it, stage by stage, by ``tests/dvc/test_dvc_yaml.py`` (DVC
  cannot read Python, and the file keeps its comments), code deps included
  (:mod:`pilamim.stages.code_deps`).

Stage name = CLI command = module = params file = MLflow run name, as in
``iterative/example-get-started``. This module imports only the params models, so every
entrance can read it without paying for torch or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pilamim.config import DataParams, Params

# Data params that change the prepared shards: all but where prepare's work runs.
PREPARE_DATA_KEYS = tuple(k for k in DataParams.model_fields
                          if k not in ("workers", "dask_scheduler"))

PathsOf = Callable[[Params], tuple[str, ...]]


@dataclass(frozen=True)
class Metric:
    """A headline number of a stage: ``key`` in its metrics JSON, ``name`` everywhere else
    (flow summary, model-version tags, ``register.gate_metric``)."""

    key: str
    name: str
    label: str
    summary: bool = True    # in the flow's summary table
    registered: bool = False  # recorded on the model version (and so comparable by the gate)
    gate: bool = False      # may be ``register.gate_metric``


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    # group -> the keys DVC watches (None: the whole params file); the MLflow run logs the groups
    params: Mapping[str, tuple[str, ...] | None]
    # stage that makes them -> the paths read (DVC deps besides code and params)
    inputs: Mapping[str, PathsOf] = field(default_factory=dict)
    outputs: PathsOf = lambda p: ()
    persist_outputs: bool = False  # DVC keeps them across reruns (a checkpoint to resume from)
    metrics_file: Callable[[Params], str | None] = lambda p: None
    metrics_in_dvc: bool = True    # listed as DVC ``metrics`` (else it lies inside an output)
    metrics: tuple[Metric, ...] = ()
    plots: PathsOf = lambda p: ()
    package_files: tuple[str, ...] = ()  # non-code files of the package it reads
    data_dir: Callable[[Params], str | None] = lambda p: None  # the prepared data it reads
    makes_data: bool = False       # its output *is* the data set: MLflow records it after it ran
    writes_registry: bool = False  # its work is an MLflow write: it cannot run untracked

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.params)

    @property
    def module(self) -> str:
        return f"pilamim.stages.{self.name}"

    @property
    def after(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def input_paths(self, params: Params) -> dict[str, str]:
        """path -> the stage that makes it."""
        return {path: maker for maker, paths in self.inputs.items() for path in paths(params)}


def _encoder(p: Params, d: str) -> tuple[str, ...]:
    return f"{d}/encoder.safetensors", f"{d}/encoder.json"


TABLE: tuple[Stage, ...] = (
    Stage("fetch", "List the data source (embedded / folder / s3://) into an inventory under "
          "raw_dir (no image is copied).",
          params={"data": ("source", "embedded_idx_dir", "raw_dir")},  # what decides the images
          outputs=lambda p: (p.data.raw_dir,),
          package_files=("pilamim/data/embedded/fashion_mnist_subset.npz",)),
    Stage("prepare", "Validate images, split train/val/test, write the manifest and dataset "
          "digest.",
          # every data param but where the work runs (the shards do not depend on it); the
          # statistics are measured at the model's input size
          params={"data": PREPARE_DATA_KEYS, "model": ("img_size",)},
          inputs={"fetch": lambda p: (p.data.raw_dir,)},
          outputs=lambda p: (p.data.out_dir,),
          metrics_file=lambda p: f"{p.data.out_dir}/dataset.json", metrics_in_dvc=False,
          data_dir=lambda p: p.data.out_dir, makes_data=True),
    Stage("pretrain", "PiLaMIM pretraining (resumes from models/pretrain/checkpoint.pt if "
          "present).",
          params={"model": None, "pretrain": None},
          inputs={"prepare": lambda p: (p.pretrain.data_dir,)},
          outputs=lambda p: (p.pretrain.out_dir,), persist_outputs=True,
          metrics_file=lambda p: p.pretrain.metrics_path,
          metrics=(Metric("val_loss", "pretrain_val_loss", "pretrain loss (val, fixed mask)"),
                   Metric("val_loss_pixel", "pretrain_val_loss_pixel",
                          "pretrain pixel loss (val)"),
                   Metric("val_loss_latent", "pretrain_val_loss_latent",
                          "pretrain latent loss (val)")),
          plots=lambda p: (p.pretrain.plots_path, p.pretrain.knn_plots_path),
          data_dir=lambda p: p.pretrain.data_dir),
    Stage("probe", "Linear probe + kNN on the frozen pretrained encoder -> metrics/probe.json.",
          params={"probe": None},
          inputs={"prepare": lambda p: (p.probe.data_dir,),
                  "pretrain": lambda p: _encoder(p, p.probe.encoder_dir)},
          outputs=lambda p: (p.probe.out_dir,),
          metrics_file=lambda p: p.probe.metrics_path,
          metrics=(Metric("top1", "probe_top1", "linear probe top-1", registered=True,
                          gate=True),
                   Metric("top5", "probe_top5", "linear probe top-5", registered=True,
                          gate=True),
                   Metric("knn_top1", "knn_top1", "kNN top-1", registered=True, gate=True),
                   Metric("knn_top5", "knn_top5", "kNN top-5", summary=False,
                          registered=True)),
          plots=lambda p: (p.probe.plots_path,),
          data_dir=lambda p: p.probe.data_dir),
    Stage("finetune", "Fine-tune the pretrained encoder end to end -> metrics/finetune.json.",
          params={"finetune": None},
          inputs={"prepare": lambda p: (p.finetune.data_dir,),
                  "pretrain": lambda p: _encoder(p, p.finetune.encoder_dir)},
          outputs=lambda p: (p.finetune.out_dir,),
          metrics_file=lambda p: p.finetune.metrics_path,
          metrics=(Metric("top1", "finetune_top1", "fine-tune top-1", registered=True,
                          gate=True),
                   Metric("top5", "finetune_top5", "fine-tune top-5", registered=True,
                          gate=True)),
          plots=lambda p: (p.finetune.plots_path,),
          data_dir=lambda p: p.finetune.data_dir),
    Stage("register", "Log + register the encoder in MLflow; the promotion gate sets @champion "
          "or @challenger -> metrics/register.json.",
          params={"register": None},
          inputs={"pretrain": lambda p: _encoder(p, p.register.encoder_dir),
                  "probe": lambda p: (p.register.probe_metrics,),
                  "finetune": lambda p: (p.register.finetune_metrics,),
                  "prepare": lambda p: (f"{p.register.data_dir}/dataset.json",)},
          metrics_file=lambda p: p.register.metrics_path,
          data_dir=lambda p: p.register.data_dir, writes_registry=True),
)

STAGES: tuple[str, ...] = tuple(s.name for s in TABLE)
BY_NAME: dict[str, Stage] = {s.name: s for s in TABLE}


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
    return BY_NAME[name]


def waves() -> list[tuple[str, ...]]:
    """The stages in dependency order, grouped: a wave's stages need only earlier waves, so
    they may run side by side (probe and finetune both read only prepare's and pretrain's
    outputs)."""
    done: set[str] = set()
    order: list[tuple[str, ...]] = []
    while len(done) < len(TABLE):
        ready = tuple(s.name for s in TABLE if s.name not in done and set(s.after) <= done)
        if not ready:
            raise ValueError(f"the stage table has a cycle among {set(STAGES) - done}")
        order.append(ready)
        done.update(ready)
    return order


def registered_metrics() -> dict[str, tuple[str, str]]:
    """Metric name -> (stage whose metrics file holds it, key in that file): what a model
    version records, and what ``register.gate_metric`` may name."""
    return {m.name: (s.name, m.key) for s in TABLE for m in s.metrics if m.registered}

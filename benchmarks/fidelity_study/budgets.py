"""Study budgets: the params every entry shares, so the comparison is like for like.

A budget starts from the repo's embedded defaults (``params/*.yaml``, the recipe a user gets
from ``pilamim run``) and changes only size and length: model size, epochs, batch, data cap.
Every preset and floor of one study uses the same resulting params except ``model.preset``
and the seeds, so a difference in the report comes from the objective, not the recipe.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pilamim.config import Params, ParamsError
from pilamim.params_files import dump_params, load_params

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params"

# group -> key -> value, applied on top of the params directory.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    # End-to-end check in about a minute: 30 images per class, micro ViT, one epoch.
    "micro": {
        "data": {"max_images_per_class": 30},
        "model": {"size": "micro", "depth": None, "img_size": 16, "patch_size": 4,
                  "decoder_depth": 1, "decoder_width": 16, "decoder_heads": 2},
        "pretrain": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 0},
        "probe": {"epochs": 20, "warmup_epochs": 2, "batch_size": 16, "base_lr": 100.0},
        "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32},
    },
    # The real study on 2 CPU cores: exactly the embedded default a user gets (params/).
    "cpu": {},
    # GPU scale (--scale): ViT-S, a deeper decoder, 25x the CPU schedule.
    "gpu": {
        "data": {"max_images_per_class": None},
        "model": {"size": "small", "depth": None, "img_size": 28, "patch_size": 4,
                  "decoder_depth": 4, "decoder_width": 256, "decoder_heads": 8},
        "pretrain": {"epochs": 100, "batch_size": 256, "warmup_epochs": 10, "num_workers": 4},
        "probe": {"epochs": 100, "warmup_epochs": 10, "batch_size": 256},
        "finetune": {"epochs": 20, "warmup_epochs": 2, "batch_size": 128, "num_workers": 4},
    },
}
DEFAULT_SEEDS: dict[str, list[int]] = {"micro": [0], "cpu": [0, 1, 2], "gpu": [0, 1, 2]}
# budget -> (worker processes, torch threads each; None = torch's default). On CPU one
# single-threaded process per core: these small models gain little from a second thread
# and lose badly when the cores are shared (measured, see the report's budget notes).
RUNTIME: dict[str, tuple[int, int | None]] = {"micro": (1, 1), "cpu": (2, 1), "gpu": (1, None)}


# Why each budget is what it is; printed in the report.
BUDGET_NOTES: dict[str, str] = {
    "micro": "Test-sized: checks the whole study end to end in about a minute. Its numbers "
             "mean nothing (13 pretraining steps of a 32-wide ViT, 60 test images).",
    "cpu": "Exactly the embedded default (`params/`, what `pilamim run` trains): a 4-block, "
           "128-wide ViT with 1-block 64-wide decoders, 30 epochs at batch 256 (960 steps) on "
           "the 8,400 training images, base lr `auto` (1.5e-3), no crop or flip, bf16 where the "
           "CPU has it; fine-tune 18 epochs at batch 128. How that recipe was found, with "
           "every measurement: docs/METHOD.md, "
           "'How the embedded recipe was measured'. Two single-threaded "
           "worker processes, one per core (small models gain little from a second thread "
           "and lose badly when the cores are shared).",
    "gpu": "ViT-S (`small`, 384 wide, 12 blocks) at 28 px with 4-block, 256-wide decoders, "
           "100 pretraining epochs (about 3,200 steps at batch 256) and 20 fine-tune epochs on "
           "the whole embedded subset; add `--set data.embedded_idx_dir=DIR` for all 70,000 "
           "Fashion-MNIST images.",
}


def runtime(budget: str, jobs: int | None, threads: int | None) -> tuple[int, int | None]:
    """(worker processes, torch threads each): the ones asked for, else the budget's."""
    default_jobs, default_threads = RUNTIME[budget]
    return (default_jobs if jobs is None else jobs,
            default_threads if threads is None else threads)


def budget_params(budget: str, params_dir: str | Path | None = None,
                  overrides: list[str] | None = None) -> Params:
    """The study's shared params: ``params_dir`` (repo ``params/``) + budget + ``overrides``.

    ``overrides`` are ``group.key=value`` strings (the CLI's ``--set``), applied last, so any
    docs/METHOD.md option (``model.norm_pix_loss=true``) can be studied and is recorded.
    """
    if budget not in BUDGETS:
        raise ParamsError(f"unknown budget {budget!r}; one of {', '.join(BUDGETS)}")
    base = load_params(params_dir or REPO_PARAMS) if Path(params_dir or REPO_PARAMS).is_dir() \
        else Params()
    raw = {g: getattr(base, g).model_dump(mode="json") for g in type(base).model_fields}
    for group, values in BUDGETS[budget].items():
        raw[group].update(values)
    merged = Params.model_validate(raw)
    if not overrides:
        return merged
    with tempfile.TemporaryDirectory() as tmp:  # reuse load_params' --set parsing and errors
        dump_params(merged, tmp)
        return load_params(tmp, overrides)


def with_paths(params: Params, work: Path, run: str, preset: str, seed: int) -> Params:
    """Copy of ``params`` for one run: its own output folders, shared data, one seed."""
    prepared = str(work / "data" / "prepared")
    out = work / "runs" / run
    return params.model_copy(deep=True, update={
        "data": params.data.model_copy(update={"raw_dir": str(work / "data" / "raw"),
                                               "out_dir": prepared}),
        "model": params.model.model_copy(update={"preset": preset}),
        "pretrain": params.pretrain.model_copy(update={
            "data_dir": prepared, "out_dir": str(out / "pretrain"), "seed": seed,
            "metrics_path": str(out / "pretrain.json"), "plots_path": str(out / "pretrain.csv"),
            "knn_plots_path": str(out / "pretrain_knn.csv"),
            "figure_every_epochs": 0, "knn_every_epochs": 0}),
        "probe": params.probe.model_copy(update={
            "data_dir": prepared, "encoder_dir": str(out / "pretrain"), "seed": seed,
            "out_dir": str(out / "probe"), "metrics_path": str(out / "probe.json"),
            "plots_path": str(out / "probe.csv")}),
        "finetune": params.finetune.model_copy(update={
            "data_dir": prepared, "encoder_dir": str(out / "pretrain"), "seed": seed,
            "out_dir": str(out / "finetune"), "metrics_path": str(out / "finetune.json"),
            "plots_path": str(out / "finetune.csv")}),
    })

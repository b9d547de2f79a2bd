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
        "model": {"size": "micro", "img_size": 16, "patch_size": 4, "decoder_depth": 1,
                  "decoder_width": 16, "decoder_heads": 2},
        "pretrain": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 0},
        "probe": {"epochs": 20, "warmup_epochs": 2, "batch_size": 16, "base_lr": 100.0},
        "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32},
    },
    # The real study on 2 CPU cores (< 2 h for 3 seeds); how it was sized: BUDGET_NOTES.
    "cpu": {
        "data": {"max_images_per_class": 600},
        "model": {"size": "mini", "img_size": 28, "patch_size": 4, "decoder_depth": 2,
                  "decoder_width": 128, "decoder_heads": 4},
        "pretrain": {"epochs": 8, "batch_size": 128, "warmup_epochs": 1},
        "probe": {"epochs": 100, "warmup_epochs": 10, "batch_size": 256},
        "finetune": {"epochs": 3, "warmup_epochs": 1, "batch_size": 128},
    },
    # GPU scale (--scale): ViT-S, a deeper decoder, 25x the CPU schedule.
    "gpu": {
        "data": {"max_images_per_class": None},
        "model": {"size": "small", "img_size": 28, "patch_size": 4, "decoder_depth": 4,
                  "decoder_width": 256, "decoder_heads": 8},
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
    "cpu": "Sized on the 2-core development machine while other jobs shared it (load 4-7), so "
           "the measurements are pessimistic. Marginal CPU-seconds per pretraining step, batch "
           "128, `mini` ViT at 28 px, one torch thread: pilamim 2.37, pilamim_nocls 2.07, mae "
           "1.19, latent 1.54. One encoder's evaluation: feature extraction + both probes about "
           "30 CPU-s, fine-tuning about 62 CPU-s per epoch on 4,200 images. One fine-tune epoch "
           "left even the random-init encoder at chance (15.7 %), so fine-tuning keeps the "
           "embedded default's 3 epochs. The whole embedded subset (8,400 training images) "
           "with the embedded default's 4 pretraining epochs would cost about 205 CPU-minutes; "
           "600 images per class (4,200 train / 600 val / 1,200 test) with 8 epochs keeps the "
           "same number of pretraining steps (256 per run) for about 146 CPU-minutes: about "
           "75 min wall-clock with two single-threaded worker processes, one per core. One "
           "process with two torch threads was far slower on the shared cores (micro study: "
           "4.4 min with 2 threads, 0.6 min with 1), hence `--jobs 2 --threads 1`.",
    "gpu": "ViT-S (`small`, 384 wide, 12 blocks) at 28 px with 4-block, 256-wide decoders, "
           "100 pretraining epochs (about 3,200 steps at batch 256) and 20 fine-tune epochs on "
           "the whole embedded subset; add `--set data.embedded_idx_dir=DIR` for all 70,000 "
           "Fashion-MNIST images.",
}


def budget_params(budget: str, params_dir: str | Path | None = None,
                  overrides: list[str] | None = None) -> Params:
    """The study's shared params: ``params_dir`` (repo ``params/``) + budget + ``overrides``.

    ``overrides`` are ``group.key=value`` strings (the CLI's ``--set``), applied last, so any
    METHOD.md option (``model.norm_pix_loss=true``) can be studied and is recorded.
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

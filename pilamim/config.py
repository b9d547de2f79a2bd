"""Typed parameters for every stage, as read from ``params/*.yaml`` (:mod:`pilamim.params_files`).

One pydantic model per params file, one file per stage (``data.yaml`` feeds ``prepare``,
``model.yaml`` + ``pretrain.yaml`` feed ``pretrain`` ...). The same models serve the CLI, DVC
(which reads the YAML files as ``params:``), Prefect flow parameters and tests, so a bad value
is caught once, before any work starts, with the file, key, value and what is allowed.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    field_validator,
    model_validator,
)

Preset = Literal["pilamim", "pilamim_nocls", "mae", "latent", "latent_cls"]
ModelSize = Literal["micro", "mini", "tiny", "small", "base", "large"]


class ParamsError(ValueError):
    """A params file or override is wrong; the message says where and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(_Strict):
    """``params/data.yaml`` — where images come from and how they are split (stage ``prepare``)."""

    source: str = Field(
        "embedded",
        description="'embedded' (bundled Fashion-MNIST subset), a local image folder "
        "(one subfolder per class), or 's3://bucket/prefix'",
    )
    embedded_idx_dir: str | None = Field(
        None, description="folder with the full Fashion-MNIST gzip IDX files; "
        "null uses the bundled subset"
    )
    raw_dir: str = Field("data/raw", description="where `fetch` writes the source's inventory")
    out_dir: str = Field("data/prepared",
                         description="shards/, manifest.csv and dataset.json go here")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    max_images_per_class: int | None = Field(None, ge=1, description="cap per class (null: all)")
    bad_images: Literal["skip", "fail"] = "skip"
    seed: int = Field(0, ge=0)
    shard_mb: float = Field(64.0, gt=0.0, le=4096.0,
                            description="about this many MB of image files per shard")
    workers: int | None = Field(None, ge=1, description="prepare's processes (null: all cores); "
                                "the shards do not depend on it")
    shards_uri: str | None = Field(
        None, description="s3://bucket/prefix to keep the shards in (under <prefix>/<digest>/), "
        "null: <out_dir>/shards"
    )
    shard_order: Literal["path", "shuffled"] = Field(
        "path", description="each split's image order in its shards and the manifest: 'path' "
        "(sorted), or 'shuffled' (seeded by data.seed: every shard mixes the classes, which "
        "shuffle_window_chunks needs)")
    max_side: int | None = Field(
        None, ge=16, description="re-encode images whose longer side exceeds this as JPEG of "
        "that side (as FFCV's max_resolution); null: every file's bytes are stored unchanged")
    jpeg_quality: int = Field(90, ge=50, le=100,
                              description="JPEG quality of the images max_side re-encodes")
    dask_scheduler: str | None = Field(
        None, description="tcp://host:port of a Dask scheduler to run prepare's shard tasks on "
        "(its workers must reach the source, raw_dir and out_dir's parent); null: local processes")

    @field_validator("shards_uri")
    @classmethod
    def _shards_uri_is_s3(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("s3://"):
            raise ValueError(f"shards_uri {value!r}: expected s3://bucket/prefix, or null to "
                             "keep the shards under out_dir")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be < 0.9 to leave training data")
        return self


# Options added after runs were recorded, each with the value that reproduces the code from
# before it. A run's identity (the checkpoint recipe, a study's fingerprint) leaves such an
# option out while it has that value, so upgrading does not orphan checkpoints or results.
ADDED_NEUTRAL: dict[str, dict[str, object]] = {
    "model": {"latent_weight": 1.0, "cls_weight": 1.0, "latent_target_norm": "none"},
    "probe": {"precision": "auto"},
}


def identity_values(group: str, values: dict[str, object]) -> dict[str, object]:
    """``values`` (a group's ``model_dump``) without the options at their :data:`ADDED_NEUTRAL`
    value: what decides whether two runs are the same run."""
    neutral = ADDED_NEUTRAL.get(group, {})
    return {k: v for k, v in values.items() if not (k in neutral and v == neutral[k])}


class ModelParams(_Strict):
    """``params/model.yaml`` — the PiLaMIM model; ``preset`` picks which branches exist."""

    preset: Preset = "pilamim"
    size: ModelSize = "mini"
    depth: int | None = Field(4, ge=1, le=48,
                              description="encoder blocks; null: the size's own (mini 6, base 12)")
    img_size: int = Field(28, ge=8, le=1024)
    patch_size: int = Field(4, ge=1, le=64)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    decoder_depth: int = Field(1, ge=1, le=32)
    decoder_width: int = Field(64, ge=8)
    decoder_heads: int = Field(4, ge=1)
    qkv_bias: bool = False
    init: Literal["torch", "xavier"] = Field(
        "torch", description="'torch': PyTorch default Linear init (official code); 'xavier': MAE"
    )
    norm_pix_loss: bool = Field(False, description="MAE per-patch normalised pixel target")
    target_init: Literal["copy", "independent"] = Field(
        "copy", description="'copy': target starts as the encoder (I-JEPA); 'independent': "
        "own random init (official code)"
    )
    target_token_order: Literal["raster", "shuffled"] = Field(
        "raster", description="'shuffled' reproduces the official code's bug (target tokens "
        "left permuted); for ablations only"
    )
    latent_weight: float = Field(
        1.0, gt=0.0, description="multiplies the preset's latent and [CLS] loss weights "
        "(lambda_lat, lambda_cls; the paper: 1); no effect on presets without a latent branch")
    cls_weight: float = Field(
        1.0, ge=0.0, description="multiplies lambda_cls alone, on top of latent_weight (the "
        "paper: 1); 0 keeps the [CLS] head but drops its loss, as preset pilamim_nocls does")
    latent_target_norm: Literal["none", "layer_norm"] = Field(
        "none", description="'none': the target encoder's final-norm output (official code); "
        "'layer_norm': that output normalised again without affine, per token (I-JEPA's target)")

    @model_validator(mode="after")
    def _shapes_divide(self) -> ModelParams:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_width {self.decoder_width} must be a multiple of "
                f"decoder_heads {self.decoder_heads}"
            )
        return self


# RandomResizedCrop area range, or 'auto' (pilamim.recipes.auto_crop_scale).
CropScale = tuple[float, float] | Literal["auto"]
CROP_SCALE_HELP = ("RandomResizedCrop area range [min, max]; 'auto': MAE's [0.2, 1] at 112 px "
                   "and up, narrower below, no crop at 48 px and below")


def _check_crop_scale(value: CropScale) -> None:
    if value == "auto":
        return
    lo, hi = value
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale {value} must satisfy 0 < min <= max <= 1 (or be 'auto')")


# How pretraining images reach the device (pilamim.data.pretrain_input builds each one).
InputPipeline = Literal["auto", "memory", "pil", "device", "device_bicubic"]
# How fine-tuning images reach the model (pilamim.data.memory_split says when memory applies).
FinetuneInput = Literal["auto", "memory", "pil"]


class PretrainParams(_Strict):
    """``params/pretrain.yaml`` — the optimisation recipe (stage ``pretrain``)."""

    data_dir: str = "data/prepared"
    out_dir: str = "models/pretrain"
    metrics_path: str = "metrics/pretrain.json"
    plots_path: str = Field("plots/pretrain.csv", description="loss curve CSV (DVC plots)")
    knn_plots_path: str = Field("plots/pretrain_knn.csv",
                                description="kNN-monitor curve CSV (DVC plots)")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1, description="per device, per micro-step")
    accum_steps: int = Field(1, ge=1)
    base_lr: float | Literal["auto"] = Field(
        "auto", description="lr = base_lr * global_batch / 256; 'auto': the paper's 1.5e-4, "
        "scaled up for short runs (pilamim.recipes.short_run_base_lr)")
    lr: float | None = Field(None, gt=0.0, description="absolute lr; overrides base_lr scaling")
    min_lr: float = Field(0.0, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    schedule_unit: Literal["step", "epoch"] = Field(
        "step", description="'epoch' reproduces the official once-per-epoch lr change"
    )
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    decay_all_params: bool = Field(
        False, description="true: decay biases/norms/tokens too (official code)"
    )
    ema_momentum: tuple[float, float] = Field((0.996, 1.0), description="start, end")
    grad_clip: float | None = Field(None, gt=0.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0)
    num_workers: int = Field(0, ge=0)
    shuffle_window_chunks: int | None = Field(
        None, ge=1, description="shuffle within windows of this many shards (in a shuffled "
        "shard order) so a node cache need hold only a window of a split; null: shuffle the "
        "whole split (its shards must fit the node cache)")
    input_pipeline: InputPipeline = Field(
        "auto", description="memory: the split decoded once into one uint8 tensor, flips and "
        "normalisation on the batch (images already img_size square, crop_scale (1, 1)); pil: "
        "workers decode with PIL, bicubic crop (MAE's); device: workers read bytes, the training "
        "device decodes (nvJPEG on CUDA) and crops with roi_align; device_bicubic: same, "
        "antialiased bicubic per image; auto: memory where it applies, else pil")
    crop_scale: CropScale = Field("auto", description=CROP_SCALE_HELP)
    hflip: bool = False
    checkpoint_every_steps: int = Field(50, ge=1)
    log_every_steps: int = Field(10, ge=1)
    figure_every_epochs: int = Field(5, ge=0, description="0 disables reconstruction figures")
    knn_every_epochs: int = Field(5, ge=0, description="kNN monitor on val; 0 disables")

    @model_validator(mode="after")
    def _ranges(self) -> PretrainParams:
        _check_crop_scale(self.crop_scale)
        if isinstance(self.base_lr, float) and self.base_lr <= 0:
            raise ValueError(f"base_lr {self.base_lr} must be > 0 (or 'auto')")
        m0, m1 = self.ema_momentum
        if not 0.0 <= m0 <= m1 <= 1.0:
            raise ValueError(
                f"ema_momentum {self.ema_momentum} must satisfy 0 <= start <= end <= 1")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {self.betas} must each be in [0, 1)")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self


class ProbeParams(_Strict):
    """``params/probe.yaml`` — linear probe (paper protocol) and kNN on the frozen encoder."""

    data_dir: str = "data/prepared"
    encoder_dir: str = "models/pretrain"
    out_dir: str = "models/probe"
    metrics_path: str = "metrics/probe.json"
    plots_path: str = Field("plots/probe.csv", description="per-epoch curve CSV (DVC plots)")
    epochs: int = Field(100, ge=1)
    warmup_epochs: int = Field(10, ge=0)
    batch_size: int = Field(256, ge=1)
    base_lr: PositiveFloat | Annotated[list[PositiveFloat], Field(min_length=1)] = Field(
        [1.0, 3.0, 10.0, 30.0, 100.0], description="lr = base_lr * batch / 256; a list is a grid: "
        "one head per value, the best on the val split is kept (test is never used to choose)")
    weight_decay: NonNegativeFloat | Annotated[list[NonNegativeFloat], Field(min_length=1)] = Field(
        0.0, description="a list is a grid, as base_lr")
    optimizer: Literal["lars", "sgd"] = "lars"
    augment: bool = Field(False, description="RRC + flip; false caches features once")
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="of the frozen encoder's feature extraction (auto: bf16 on CUDA "
        "and on CPUs with native bf16, else fp32)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0)
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> ProbeParams:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self


class FinetuneParams(_Strict):
    """``params/finetune.yaml`` — end-to-end fine-tuning (MAE protocol)."""

    data_dir: str = "data/prepared"
    encoder_dir: str = "models/pretrain"
    out_dir: str = "models/finetune"
    metrics_path: str = "metrics/finetune.json"
    plots_path: str = Field("plots/finetune.csv", description="per-epoch curve CSV (DVC plots)")
    epochs: int = Field(18, ge=1)
    warmup_epochs: int = Field(1, ge=0)
    batch_size: int = Field(128, ge=1)
    accum_steps: int = Field(1, ge=1)
    base_lr: float = Field(8e-3, gt=0.0, description="lr = base_lr * global_batch / 256")
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    layer_decay: float = Field(0.75, gt=0.0, le=1.0)
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    regularisation: Literal["auto", "mae", "light"] = Field(
        "auto", description="'mae': mixup, cutmix, randaugment and reprob as set here; 'light': "
        "none of them (crop, flip, label smoothing and drop path only); 'auto': 'mae' from 30 "
        "epochs on, else 'light'")
    mixup: float = Field(0.8, ge=0.0)
    cutmix: float = Field(1.0, ge=0.0)
    randaugment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm auto_augment spec")
    reprob: float = Field(0.25, ge=0.0, le=1.0, description="random erasing probability")
    crop_scale: CropScale = Field("auto", description=CROP_SCALE_HELP)
    global_pool: Literal["avg", "token"] = Field(
        "avg", description="head input: 'avg' = MAE's mean of patch tokens + new fc_norm; "
        "'token' = the pretrained [CLS] token through the pretrained final norm")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0)
    num_workers: int = Field(0, ge=0)
    shuffle_window_chunks: int | None = Field(
        None, ge=1, description="shuffle within windows of this many shards (in a shuffled "
        "shard order) so a node cache need hold only a window of a split; null: shuffle the "
        "whole split (its shards must fit the node cache)")
    input_pipeline: FinetuneInput = Field(
        "auto", description="memory: each split decoded once into one uint8 tensor, flips and "
        "normalisation on the batch (needs images already img_size square, crop_scale (1, 1) "
        "and 'light' regularisation); pil: timm's per-image transforms; auto: memory where it "
        "applies, else pil")

    @model_validator(mode="after")
    def _warmup_fits(self) -> FinetuneParams:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        _check_crop_scale(self.crop_scale)
        return self


# Gate metric name -> (metrics file group, key in that JSON). The files are the probe and
# finetune stages' outputs (``metrics/probe.json``, ``metrics/finetune.json``).
GateMetric = Literal["probe_top1", "probe_top5", "knn_top1", "finetune_top1", "finetune_top5"]


class RegisterParams(_Strict):
    """``params/register.yaml`` — log, register and gate the encoder (stage ``register``).

    Metric values are fractions in [0, 1] (``top1: 0.83``), so ``floor`` and
    ``min_improvement`` are too.
    """

    model_name: str = Field("pilamim-encoder", min_length=1, max_length=200,
                            description="registered model name in the MLflow Model Registry")
    gate_metric: GateMetric = Field(
        "probe_top1", description="probe_top1|probe_top5|knn_top1 read metrics/probe.json "
        "(top1, top5, knn_top1); finetune_top1|finetune_top5 read metrics/finetune.json"
    )
    min_improvement: float = Field(
        0.0, ge=0.0, le=1.0, description="new version must beat the champion by at least this"
    )
    floor: float = Field(0.2, ge=0.0, le=1.0,
                         description="absolute minimum of the gate metric to become champion")
    turn_timeout_s: float = Field(
        600.0, gt=0.0, description="registers of one model decide in version order; wait at "
        "most this long for an earlier version's register (another worker) to decide"
    )
    encoder_dir: str = "models/pretrain"
    probe_metrics: str = "metrics/probe.json"
    finetune_metrics: str = "metrics/finetune.json"
    data_dir: str = "data/prepared"
    metrics_path: str = "metrics/register.json"


# Params file name (without .yaml) -> model. A new stage also needs its module in
# pilamim/stages/, its entry in the stage table (pilamim/stages/__init__.py) and in dvc.yaml
# (tests/dvc/test_dvc_yaml.py checks dvc.yaml against the table).
GROUPS: dict[str, type[_Strict]] = {
    "data": DataParams,
    "model": ModelParams,
    "pretrain": PretrainParams,
    "probe": ProbeParams,
    "finetune": FinetuneParams,
    "register": RegisterParams,
}


# The group is called ``register`` like the stage; pydantic warns that the name shadows
# ``ABCMeta.register`` (a class-level method nobody calls on Params). Harmless, so silenced.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows',
                        category=UserWarning)


class Params(_Strict):
    """Every group, as read from one params directory."""

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    probe: ProbeParams = ProbeParams()
    finetune: FinetuneParams = FinetuneParams()
    register: RegisterParams = RegisterParams()

"""Recipe rules: the paper's values at the paper's scale, scaled down for short runs and small
images, and what ``auto`` in the params resolves to in the code that trains."""

import pytest
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from pilamim.config import GROUPS, FinetuneParams, Params, ParamsError, PretrainParams
from pilamim.evaluate.finetune import build_mixup, finetune_transform
from pilamim.params_files import load_params
from pilamim.recipes import (
    PAPER_BASE_LR,
    auto_crop_scale,
    resolve_base_lr,
    resolve_crop_scale,
    short_run_base_lr,
    uses_mae_regularisation,
)
from pilamim.train.step import Plan


def test_short_run_lr_is_the_papers_for_long_runs_and_10x_for_short_ones():
    assert short_run_base_lr(500_000) == PAPER_BASE_LR
    assert short_run_base_lr(100_000) == pytest.approx(PAPER_BASE_LR)
    assert short_run_base_lr(1_000) == pytest.approx(10 * PAPER_BASE_LR)
    assert short_run_base_lr(300) == pytest.approx(10 * PAPER_BASE_LR)  # capped
    assert short_run_base_lr(10_000) == pytest.approx(PAPER_BASE_LR * 10 ** 0.5)
    lrs = [short_run_base_lr(s) for s in (500, 2_000, 8_000, 30_000, 200_000)]
    assert lrs == sorted(lrs, reverse=True)
    assert resolve_base_lr(3e-4, 10) == 3e-4  # a number is taken as given
    with pytest.raises(ValueError):
        short_run_base_lr(0)


def test_crop_scale_is_maes_at_224_and_off_for_small_images():
    assert auto_crop_scale(224) == (0.2, 1.0)
    assert auto_crop_scale(112) == (0.2, 1.0)
    assert auto_crop_scale(64) == pytest.approx((0.5625, 1.0))
    assert auto_crop_scale(48) == auto_crop_scale(28) == (1.0, 1.0)
    assert resolve_crop_scale([0.3, 0.9], 28) == (0.3, 0.9)


def test_mae_regularisation_only_for_long_fine_tunes():
    assert uses_mae_regularisation("auto", 100) and not uses_mae_regularisation("auto", 6)
    assert uses_mae_regularisation("mae", 1) and not uses_mae_regularisation("light", 100)


def test_auto_lr_follows_the_plans_step_count():
    params = Params()
    params.pretrain.batch_size, params.pretrain.epochs = 64, 5
    plan = Plan(params, train_size=6400, world=1)  # 100 steps/epoch, 500 steps
    assert plan.total_steps == 500
    assert plan.base_lr == pytest.approx(10 * PAPER_BASE_LR)
    assert plan.peak_lr == pytest.approx(10 * PAPER_BASE_LR * 64 / 256)
    params.pretrain.base_lr = 1e-4
    assert Plan(params, 6400, 1).peak_lr == pytest.approx(1e-4 * 64 / 256)
    params.pretrain.lr = 2e-3  # an absolute lr wins over both
    assert Plan(params, 6400, 1).peak_lr == 2e-3


def _has(tf, kind: type | str) -> bool:
    """RandAugment is timm's RandAugment class; erasing its RandomErasing."""
    return any(type(t).__name__ == kind if isinstance(kind, str) else isinstance(t, kind)
               for t in tf.transforms)


def test_light_fine_tune_has_no_mixup_randaugment_or_erasing():
    light = FinetuneParams(epochs=6, warmup_epochs=1)  # auto -> light below 30 epochs
    tf = finetune_transform(28, [0.3], [0.3], light, train=True)
    assert build_mixup(light, 10) is None
    assert not _has(tf, "RandAugment") and not _has(tf, RandomErasing)
    crop = next(t for t in tf.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    assert crop.scale == (1.0, 1.0)  # 28 px: no crop (auto)

    mae = FinetuneParams(epochs=6, warmup_epochs=1, regularisation="mae", crop_scale=[0.08, 1])
    tf = finetune_transform(28, [0.3], [0.3], mae, train=True)
    assert build_mixup(mae, 10) is not None
    assert _has(tf, "RandAugment") and _has(tf, RandomErasing)
    crop = next(t for t in tf.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    assert crop.scale == (0.08, 1.0)


def test_params_accept_auto_and_reject_other_words(tmp_path):
    assert PretrainParams(base_lr="auto", crop_scale="auto").base_lr == "auto"
    assert PretrainParams(base_lr=3e-4).base_lr == 3e-4
    for group in GROUPS:
        (tmp_path / f"{group}.yaml").write_text("{}\n")
    (tmp_path / "pretrain.yaml").write_text("base_lr: fast\n")
    with pytest.raises(ParamsError, match="base_lr"):
        load_params(tmp_path)
    (tmp_path / "pretrain.yaml").write_text("crop_scale: small\n")
    with pytest.raises(ParamsError, match="crop_scale"):
        load_params(tmp_path)
    (tmp_path / "pretrain.yaml").write_text("base_lr: -1.0\n")
    with pytest.raises(ParamsError, match="base_lr"):
        load_params(tmp_path)

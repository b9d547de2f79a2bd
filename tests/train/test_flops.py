"""FLOPs per image from the layer shapes (what the loop's MFU divides by) against torch's own
flop counter on a real training step; the device peak; the loop logging both."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pilamim.config import ModelParams, Params, PretrainParams
from pilamim.loggers import MemoryLogger
from pilamim.train import pretrain
from pilamim.train.distributed import DistInfo
from pilamim.train.flops import (
    PEAK_FLOPS_ENV,
    analytic_flops,
    peak_flops,
    peak_flops_of,
    step_flops_per_image,
)
from pilamim.train.step import TrainStep, build_training
from tests.conftest import micro_model_params, micro_run_params


@pytest.mark.parametrize("preset", ["pilamim", "mae"])
def test_analytic_flops_match_torch_flop_counter_on_a_real_step(preset):
    """One full step (fwd + bwd + AdamW + EMA) of a micro model, counted by torch. Attention
    runs on the math backend: plain matmuls the counter sees on any device, 4 per block in the
    backward (no fused recompute), i.e. the model FLOPs. ``depth=3`` is not micro's own 2."""
    model_params = micro_model_params(preset=preset, depth=3)
    params = Params(model=model_params,
                    pretrain=PretrainParams(batch_size=2, lr=1e-3, epochs=1, warmup_epochs=0.0,
                                            precision="fp32", device="cpu"))
    cpu, info = torch.device("cpu"), DistInfo()
    model, optimizer, plan, mask_gen = build_training(params, 1, 200, info, cpu)
    assert len(model.encoder.blocks) == 3
    step = TrainStep(model, optimizer, plan, mask_gen, info, cpu)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step(iter([images]), 0)
    counted = counter.get_total_flops() / 2
    assert counted > 0
    assert step_flops_per_image(model_params, 1, model.patch_matmul) == pytest.approx(counted,
                                                                                      rel=1e-3)


def test_explicit_depth_scales_the_encoder_blocks():
    """``depth`` sets the encoder's and the target's blocks; null is the size's own (mini: 6)."""
    def total(depth):
        return step_flops_per_image(ModelParams(size="mini", depth=depth), 1)

    per_block = total(5) - total(4)
    assert per_block > 0
    assert total(6) - total(4) == pytest.approx(2 * per_block)
    assert total(1) == pytest.approx(total(4) - 3 * per_block)
    assert total(None) == total(6) > total(4)  # the embedded default (depth 4) costs less
    # the decoders do not depend on the encoder's depth; encoder + target do, in proportion
    a = analytic_flops("mini", "pilamim", 28, 4, 1, 64, in_chans=1, depth=2)
    b = analytic_flops("mini", "pilamim", 28, 4, 1, 64, in_chans=1, depth=4)
    assert a["pixel_decoder"] == b["pixel_decoder"]
    assert a["latent_decoder"] == b["latent_decoder"]
    assert analytic_flops("mini", "mae", 28, 4, 1, 64, depth=None) == analytic_flops(
        "mini", "mae", 28, 4, 1, 64, depth=6)


def test_peak_flops_cpu_table_and_override(monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA L4") == 121e12
    assert peak_flops_of("NVIDIA L40S") is None  # not an L4
    assert peak_flops_of("NVIDIA GeForce RTX 4090") is None
    monkeypatch.setenv(PEAK_FLOPS_ENV, "2.5e12")
    assert peak_flops(torch.device("cpu")) == 2.5e12
    for bad in ("fast", "0", "-1e12", "inf"):
        monkeypatch.setenv(PEAK_FLOPS_ENV, bad)
        with pytest.raises(ValueError, match=PEAK_FLOPS_ENV):
            peak_flops(torch.device("cpu"))


@pytest.mark.parametrize("peak", [None, "1e12"])
def test_pretraining_logs_tflops_and_mfu_when_the_peak_is_known(tmp_path, tiny_prepared,
                                                                 monkeypatch, peak):
    if peak is None:
        monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    else:
        monkeypatch.setenv(PEAK_FLOPS_ENV, peak)
    params = micro_run_params(tmp_path, tiny_prepared, epochs=1, figure_every_epochs=0,
                              knn_every_epochs=0)
    log = MemoryLogger()
    pretrain(params, log)
    per_image = step_flops_per_image(params.model, 1)
    tflops, images = log.series("pretrain/tflops_per_s"), log.series("pretrain/images_per_s")
    assert len(tflops) == len(images) == 210 // 16
    assert all(t > 0 for t in tflops)
    assert tflops == pytest.approx([per_image * i / 1e12 for i in images])
    mfu = log.series("pretrain/mfu")
    if peak is None:
        assert mfu == []  # CPU: no peak, no MFU
    else:
        assert mfu == pytest.approx(tflops)  # a peak of 1 TFLOP/s on one process

"""CPU bf16: ``precision: auto`` follows the CPU's flags, and attention keeps its softmax
product in fp32 under CPU autocast (torch's bf16 CPU flash attention is ~6x slower)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import Attention

from pilamim.device import autocast_dtype, cpu_has_native_bf16
from pilamim.model import build_encoder
from pilamim.model.attention import CpuAutocastAttention
from tests.conftest import micro_model_params

CPU = torch.device("cpu")


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),  # Zen 4+, Cooper Lake
    ("fpu avx512f amx_bf16 amx_tile", True),  # Sapphire Rapids
    ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # bf16 only emulated
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\n")
    assert cpu_has_native_bf16(info) is native
    assert cpu_has_native_bf16(tmp_path / "missing") is False  # not Linux: fp32


def test_auto_precision_is_bf16_only_where_the_cpu_has_it():
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype(CPU, "auto") is expected
    assert autocast_dtype(CPU, "fp32") is None and autocast_dtype(CPU, "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16


def test_attention_runs_sdpa_in_fp32_under_cpu_autocast_and_is_timm_elsewhere():
    torch.manual_seed(0)
    encoder = build_encoder(micro_model_params(), 1)
    swapped = [m for m in encoder.modules() if isinstance(m, Attention)]
    assert swapped and all(type(m) is CpuAutocastAttention for m in swapped)
    attn, x = swapped[0], torch.randn(4, 17, encoder.embed_dim)
    plain = Attention(encoder.embed_dim, attn.num_heads, qkv_bias=False)
    plain.load_state_dict(attn.state_dict())  # same parameters, same state dict keys
    assert torch.equal(attn(x), plain(x))  # outside autocast: timm's forward
    seen = []
    hook = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(q.dtype)
        return hook(q, k, v, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
    finally:
        torch.nn.functional.scaled_dot_product_attention = hook
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), plain(x), atol=0.05, rtol=0.05)


def test_an_exported_encoder_loads_into_plain_timm(tmp_path):
    from pilamim.model.encoder import encoder_spec
    from pilamim.model.export import export_encoder, load_encoder

    params = micro_model_params()
    encoder = build_encoder(params, 1)
    name, kwargs = encoder_spec(params, 1)
    export_encoder(encoder, name, kwargs, tmp_path)
    loaded = load_encoder(tmp_path)
    assert all(type(m) is CpuAutocastAttention for m in loaded.modules()
               if isinstance(m, Attention))
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    plain_timm = timm.create_model(name, pretrained=False, **kwargs)
    plain_timm.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")))  # strict

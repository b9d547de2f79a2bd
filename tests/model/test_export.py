import json

import pytest
import timm
import torch

from pilamim.model import build_pilamim
from pilamim.model.export import export_encoder, load_encoder
from tests.conftest import micro_model_params


def test_exported_encoder_loads_into_timm_with_equal_outputs(tmp_path):
    model = build_pilamim(micro_model_params(), in_chans=1)
    name, kwargs = model.encoder_spec()
    export_encoder(model.encoder, name, kwargs, tmp_path)
    spec = json.loads((tmp_path / "encoder.json").read_text())
    assert spec["model_name"] == name and spec["feature_dim"] == 32

    # plain timm, no pilamim involved: strict load, no missing or unexpected keys
    from safetensors.torch import load_file
    fresh = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    result = fresh.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    x = torch.randn(4, 1, 16, 16)
    model.encoder.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), model.encoder(x), atol=1e-6)
        assert torch.allclose(load_encoder(tmp_path)(x), model.encoder(x), atol=1e-6)
        assert fresh(x).shape == (4, 32)


def test_load_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pilamim pretrain"):
        load_encoder(tmp_path)
    model = build_pilamim(micro_model_params(), in_chans=1)
    name, kwargs = model.encoder_spec()
    export_encoder(model.encoder, name, {**kwargs, "depth": 3}, tmp_path)
    with pytest.raises(RuntimeError, match="missing"):
        load_encoder(tmp_path)
    export_encoder(model.encoder, name, kwargs, tmp_path)
    head = load_encoder(tmp_path, num_classes=5, global_pool="avg")
    assert head(torch.randn(2, 1, 16, 16)).shape == (2, 5)

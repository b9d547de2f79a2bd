"""Serving @champion: the registered model is the embedder over raw pixels.

The embedder's input handling in-process (PIL converts, the evaluation transform resizes and
normalises: the same numbers as evaluation, to the bit; refusals), then the real thing: the
register step, then ``mlflow models serve -m models:/<name>@champion`` in a subprocess, fed JSON
pixels.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import requests
import timm
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pilamim.data import transforms
from pilamim.data.bit_depth import to_8bit
from pilamim.registry import embedder as emb
from pilamim.registry.model_logging import load_registered_encoder
from pilamim.stages import register as register_step
from tests.mlflow_store import (
    FEATURE_DIM,
    free_port,
    stop_process_group,
    wait_until_up,
    write_metrics,
    write_prepared,
)

MEAN, STD = [0.286], [0.353]      # export_tiny_encoder's
RGB_MEAN, RGB_STD = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
CONFIG = {"in_chans": 1, "img_size": 16, "mean": MEAN, "std": STD}


def _smooth(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 image with structure (noise upsampled), so resizing differences show."""
    small = rng.integers(0, 256, size=(shape[0] // 4 + 2, shape[1] // 4 + 2, *shape[2:]),
                         dtype=np.uint8)
    image = Image.fromarray(small.squeeze()).resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(image).reshape(shape)


def _as_evaluated(image: np.ndarray, config: dict) -> torch.Tensor:
    """What evaluation makes of this image: the data loader's conversion (``to_8bit``) and
    ``pilamim.data.transforms.eval_transform``."""
    mode = {1: "L", 3: "RGB"}[config["in_chans"]]
    pil = to_8bit(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image), mode)
    return transforms.eval_transform(config["img_size"], config["mean"], config["std"])(pil)


def _by_hand(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 1) at the model's size -> the encoder's normalised float32 input."""
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return torch.from_numpy(((x - MEAN[0]) / STD[0]).astype(np.float32))


# ----------------------------------------------------------------- input handling, in-process


def test_embedder_is_self_contained_and_builds_the_eval_transform():
    """No pilamim import at serving time, yet the very pipeline evaluation uses."""
    tree = ast.parse(Path(emb.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] == "pilamim"}
    assert emb.EVAL_CROP_RATIO == transforms.EVAL_CROP_RATIO
    assert emb.EVAL_RESIZE_MIN == transforms.EVAL_RESIZE_MIN
    for size in (16, 28, 63, 64, 96, 224):
        for mean, std in ((MEAN, STD), (RGB_MEAN, RGB_STD)):
            assert (repr(emb.eval_transform(size, mean, std))
                    == repr(transforms.eval_transform(size, mean, std)))


@pytest.mark.parametrize(("img_size", "hw"), [(16, (40, 30)), (16, (12, 20)), (28, (20, 37)),
                                              (64, (64, 64)), (96, (150, 120)),
                                              (96, (200, 97))])
def test_resize_is_the_eval_transforms(img_size, hw):
    """Larger, smaller, wide and tall images: the numbers evaluation gets, exactly."""
    image = _smooth(np.random.default_rng(img_size + hw[0]), (*hw, 1))
    config = {**CONFIG, "img_size": img_size}
    got = emb.images_to_tensor(image[None], config)[0]
    assert got.shape == (1, img_size, img_size)
    torch.testing.assert_close(got, _as_evaluated(image, config), rtol=0, atol=0)


@pytest.mark.parametrize("chans", [1, 3, 4])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_channels_convert_as_the_data_loader_does(chans, in_chans):
    """Grey, RGB and RGBA into grey and RGB encoders: PIL's convert (RGBA drops alpha)."""
    rng = np.random.default_rng(chans)
    images = np.stack([_smooth(rng, (24, 20, chans)) for _ in range(2)])
    mean, std = (MEAN, STD) if in_chans == 1 else (RGB_MEAN, RGB_STD)
    config = {"in_chans": in_chans, "img_size": 16, "mean": mean, "std": std}
    got = emb.images_to_tensor(images, config)
    assert got.shape == (2, in_chans, 16, 16)
    for image, row in zip(images, got, strict=True):
        torch.testing.assert_close(row, _as_evaluated(image, config), rtol=0, atol=0)


def test_images_at_the_model_size_are_only_normalised():
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 1), dtype=np.uint8)
    expected = _by_hand(pixels)
    for form in (pixels, pixels[..., 0], pixels.astype(np.int64), pixels.astype(np.uint16)):
        torch.testing.assert_close(emb.images_to_tensor(form, CONFIG), expected)
    read_only = np.asarray(Image.fromarray(pixels[0, ..., 0]))[None]     # PIL: not writable
    torch.testing.assert_close(emb.images_to_tensor(read_only, CONFIG), expected[:1])
    assert emb.images_to_tensor(pixels[:0], CONFIG).shape == (0, 1, 16, 16)


def test_timm_data_config_of_the_loaded_encoder_is_the_eval_transform(encoder_dir):
    """``load_timm_encoder`` replaces the architecture's ImageNet data config (3 x 224 x 224,
    mean 0.5) by ours: timm's own eval transform then gives evaluation's numbers."""
    config = json.loads((encoder_dir / "encoder.json").read_text())
    encoder = emb.load_timm_encoder(encoder_dir / "encoder.safetensors", config)
    data_config = timm.data.resolve_data_config({}, model=encoder)
    assert data_config["input_size"] == (1, 16, 16) and data_config["mean"] == tuple(MEAN)
    rng = np.random.default_rng(4)
    for size, hw, mean, std in ((16, (40, 30), MEAN, STD), (96, (150, 120), RGB_MEAN, RGB_STD)):
        image = _smooth(rng, (*hw, len(mean)))
        cfg = {"in_chans": len(mean), "img_size": size, "mean": mean, "std": std}
        timm_transform = timm.data.create_transform(**emb.timm_data_config(cfg))
        pil = Image.fromarray(image.squeeze(-1) if len(mean) == 1 else image)
        torch.testing.assert_close(timm_transform(pil), _as_evaluated(image, cfg))


@pytest.mark.parametrize(("images", "words"), [
    (np.zeros((2, 16, 16, 1), np.float32), "integer pixels 0..255.*got dtype float32"),
    (np.zeros((2, 16, 16), np.float64), "not scaled or normalised"),
    (np.zeros((2, 16, 16, 1), bool), "integer pixels 0..255.*got dtype bool"),
    (np.zeros((16, 16), np.uint8), r"shaped \(N, H, W, C\) or \(N, H, W\).*x\[None\]"),
    (np.zeros((1, 2, 16, 16, 1), np.uint8), r"got shape \(1, 2, 16, 16, 1\)"),
    (np.zeros((2, 1, 16, 16), np.uint8), "1, 3 or 4 channels last"),
    (np.zeros((2, 0, 16, 1), np.uint8), "no pixels"),
    (np.full((2, 16, 16, 1), 256, np.int64), r"0\.\.255, got 256\.\.256"),
    (np.full((2, 16, 16, 1), -1, np.int16), r"0\.\.255, got -1\.\.-1"),
])
def test_bad_input_is_refused_with_what_was_expected(images, words):
    with pytest.raises(ValueError, match=words):
        emb.images_to_tensor(images, CONFIG)


def test_predict_any_layout_and_size(encoder_dir):
    """The model class itself (no MLflow in between): every accepted form, and empty batches."""
    model = emb.EncoderEmbedder()
    model.load_context(SimpleNamespace(model_config={"device": "cpu"}, artifacts={
        "encoder_weights": str(encoder_dir / "encoder.safetensors"),
        "encoder_config": str(encoder_dir / "encoder.json")}))
    model.batch_size = 2                                       # chunks: 2 + 2 + 1
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(5, 16, 16, 1), dtype=np.uint8)
    with torch.no_grad():
        expected = model.encoder(_by_hand(pixels)).numpy()
    for form in (pixels, pixels[..., 0], pixels.astype(np.int64)):
        np.testing.assert_allclose(model.predict(None, form), expected, atol=1e-5)
    rgb = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    luma = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb])
    np.testing.assert_allclose(model.predict(None, rgb), model.predict(None, luma), atol=1e-6)
    large = rng.integers(0, 256, size=(2, 40, 33, 1), dtype=np.uint8)
    assert model.predict(None, large).shape == (2, FEATURE_DIM)
    empty = model.predict(None, np.zeros((0, 16, 16, 1), np.uint8))
    assert empty.shape == (0, FEATURE_DIM) and empty.dtype == np.float32
    with pytest.raises(ValueError, match="got dtype float32"):
        model.predict(None, pixels.astype(np.float32))


# ----------------------------------------------------------------- mlflow models serve


def test_champion_serves_raw_pixels_like_the_torch_encoder(tmp_path, params, encoder_dir):
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5, top5=0.9)
    record = register_step.register(params)
    assert record["action"] == "champion"
    name = params.register.model_name
    champion = f"models:/{name}@champion"
    version = MlflowClient().get_model_version_by_alias(name, "champion")
    assert version.source == record["logged_model_uri"] == record["embedder_uri"]

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, size=(2, 16, 16, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    large = rng.integers(0, 256, size=(2, 24, 20, 1), dtype=np.uint8)
    config = json.loads((encoder_dir / "encoder.json").read_text())
    assert (config["mean"], config["std"]) == (MEAN, STD)
    module = load_registered_encoder(champion)
    with torch.no_grad():
        expected = module(_by_hand(grey)).numpy()
    in_process = mlflow.pyfunc.load_model(champion)
    np.testing.assert_allclose(in_process.predict(grey), expected, atol=1e-4)

    port = free_port()
    # `mlflow models serve` runs `uvicorn` from PATH: the venv's, as after `source activate`.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    assert env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")      # the test's own store
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion,
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{url}/ping", tmp_path / "serve.log", "mlflow models serve", 120)

        def invoke(images) -> requests.Response:
            return requests.post(f"{url}/invocations", json={"inputs": images.tolist()},
                                 timeout=60)

        served = invoke(grey)
        assert served.status_code == 200, served.text[-2000:]
        np.testing.assert_allclose(np.asarray(served.json()["predictions"]), expected,
                                   atol=1e-4)
        for images in (rgb, large):                  # converted and resized by the model
            served = invoke(images)
            assert served.status_code == 200, served.text[-2000:]
            np.testing.assert_allclose(np.asarray(served.json()["predictions"]),
                                       in_process.predict(images), atol=1e-4)
        # The signature's rank is enforced: grayscale stacks need their channel axis.
        refused = invoke(grey[..., 0])
        assert refused.status_code == 400
        assert "does not match expected shape" in refused.json()["message"]
        assert invoke(grey.astype(np.int64) + 200).status_code == 400      # 200..455
    finally:
        stop_process_group(proc)
        log.close()

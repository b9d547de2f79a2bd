"""Serving @champion: the registered model is the embedder over raw pixels.

The embedder's input handling in-process (channels as PIL converts them, resizing as the
evaluation transform does, refusals), then the real thing: the register step, then
``mlflow models serve -m models:/<name>@champion`` in a subprocess, fed JSON pixels.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pilamim.data import transforms
from pilamim.registry import embedder as emb
from pilamim.stages import register as register_step
from tests.mlflow_store import FEATURE_DIM, free_port, wait_until_up, write_metrics, write_prepared

MEAN, STD = [0.286], [0.353]      # export_tiny_encoder's
GREY_LEVEL = 1 / 255 / STD[0]     # one pixel value, in normalised units


def _smooth(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 image with structure (noise upsampled), so resizing differences show."""
    small = rng.integers(0, 256, size=(shape[0] // 4 + 2, shape[1] // 4 + 2, *shape[2:]),
                         dtype=np.uint8)
    image = Image.fromarray(small.squeeze()).resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(image).reshape(shape)


def _by_hand(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 1) at the model's size -> the encoder's normalised float32 input."""
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return torch.from_numpy(((x - MEAN[0]) / STD[0]).astype(np.float32))


# ----------------------------------------------------------------- input handling, in-process


def test_embedder_is_self_contained_and_agrees_with_the_eval_transform_constants():
    tree = ast.parse(Path(emb.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] == "pilamim"}
    assert emb.EVAL_CROP_RATIO == transforms.EVAL_CROP_RATIO
    assert emb.EVAL_RESIZE_MIN == transforms.EVAL_RESIZE_MIN


def test_channels_convert_as_pil_does():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(2, 9, 7, 4), dtype=np.uint8)
    for image in rgba:
        expected = np.asarray(Image.fromarray(image[..., :3]).convert("L"))
        assert np.array_equal(emb.match_channels(image[None, ..., :3], 1)[0, ..., 0], expected)
        rgba_l = np.asarray(Image.fromarray(image, "RGBA").convert("L"))
        assert np.array_equal(emb.match_channels(image[None], 1)[0, ..., 0], rgba_l)
        rgba_rgb = np.asarray(Image.fromarray(image, "RGBA").convert("RGB"))
        assert np.array_equal(emb.match_channels(image[None], 3)[0], rgba_rgb)
    grey = rgba[..., :1]
    repeated = emb.match_channels(grey, 3)
    assert repeated.shape == (2, 9, 7, 3)
    assert np.array_equal(repeated[0], np.asarray(Image.fromarray(grey[0, ..., 0]).convert("RGB")))


@pytest.mark.parametrize(("img_size", "hw"), [(16, (40, 30)), (16, (12, 20)), (28, (20, 37)),
                                              (64, (64, 64)), (96, (150, 120))])
def test_resize_matches_the_eval_transform(img_size, hw):
    """Torch's antialiased bicubic in PIL's two rounded passes is PIL's within a grey level or
    so (Pillow 13 resamples some tall images height first: a few levels on a few pixels)."""
    image = _smooth(np.random.default_rng(img_size), hw)
    expected = transforms.eval_transform(img_size, MEAN, STD)(Image.fromarray(image)).numpy()
    got = emb.images_to_tensor(image[None], MEAN, STD, 1, img_size)[0].numpy()
    assert got.shape == expected.shape == (1, img_size, img_size)
    assert np.abs(got - expected).max() <= 4 * GREY_LEVEL * 1.001
    assert np.abs(got - expected).mean() < GREY_LEVEL / 4


def test_images_at_the_model_size_are_only_normalised():
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 1), dtype=np.uint8)
    expected = _by_hand(pixels)
    for form in (pixels, pixels[..., 0], pixels.astype(np.int64), pixels.astype(np.uint16)):
        torch.testing.assert_close(emb.images_to_tensor(form, MEAN, STD, 1, 16), expected)
    read_only = np.asarray(Image.fromarray(pixels[0, ..., 0]))[None]     # PIL: not writable
    torch.testing.assert_close(emb.images_to_tensor(read_only, MEAN, STD, 1, 16), expected[:1])


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
        emb.images_to_tensor(images, MEAN, STD, 1, 16)


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
    luma = emb.match_channels(rgb, 1)
    np.testing.assert_allclose(model.predict(None, rgb), model.predict(None, luma), atol=1e-6)
    large = rng.integers(0, 256, size=(2, 40, 33, 1), dtype=np.uint8)
    assert model.predict(None, large).shape == (2, FEATURE_DIM)
    empty = model.predict(None, np.zeros((0, 16, 16, 1), np.uint8))
    assert empty.shape == (0, FEATURE_DIM) and empty.dtype == np.float32


# ----------------------------------------------------------------- mlflow models serve


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_champion_serves_raw_pixels_like_the_torch_encoder(tmp_path, params, encoder_dir):
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5, top5=0.9)
    record = register_step.register(params)
    assert record["action"] == "champion"
    name = params.register.model_name
    champion = f"models:/{name}@champion"
    version = MlflowClient().get_model_version_by_alias(name, "champion")
    assert version.tags["encoder_uri"] == record["encoder_uri"]
    assert version.source == record["logged_model_uri"] == record["embedder_uri"]

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, size=(2, 16, 16, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    large = rng.integers(0, 256, size=(2, 24, 20, 1), dtype=np.uint8)
    config = json.loads((encoder_dir / "encoder.json").read_text())
    assert (config["mean"], config["std"]) == (MEAN, STD)
    module = mlflow.pytorch.load_model(version.tags["encoder_uri"])
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
        _stop(proc)
        log.close()

"""MLflow pyfunc model: a batch of raw images in, one embedding per image out.

This is the model the registry versions (``models:/<name>@champion``), so
``mlflow models serve -m models:/pilamim-encoder@champion`` takes pixels as PIL/numpy give them
and the caller never needs our mean/std. Logged by
:func:`pilamim.registry.model_logging.log_encoder_model` as a "model from code": MLflow copies
this file into the model and runs it at load time, so it must stay self-contained (numpy,
torch, timm, safetensors and mlflow only; no ``pilamim`` imports). The weights travel as the
model's artifacts ``encoder_weights`` (``encoder.safetensors``) and ``encoder_config``
(``encoder.json``: ``model_name``, ``kwargs``, ``feature_dim``, ``mean``, ``std``, ``img_size``,
``in_chans``) — no pickle involved.

Input: integer pixels in 0..255 (``uint8`` as ``np.asarray(pil_image)`` gives them; any integer
dtype is cast after a range check), shaped ``(N, H, W, C)``; ``(N, H, W)`` (grayscale) is taken
as C = 1. The model's signature declares ``uint8 (-1, -1, -1, -1)``: MLflow's schema
enforcement (``pyfunc.load_model(...).predict`` and the scoring server) checks the rank, so
through MLflow send the 4-D form — ``np.stack(images)[..., None]`` for grayscale; the scoring
server parses JSON ``{"inputs": [...nested lists...]}`` straight to ``uint8`` (refusing values
outside 0..255, but cutting fractions: this model never sees JSON floats). Every batch is
made to look like the evaluation images (``pilamim.data.transforms.eval_transform``, whose
numbers the registry's gate compared):

1. Channels: C = 4 (RGBA) drops alpha; C = 3 -> 1 by ITU-R 601-2 luma in PIL's integer
   arithmetic (``(19595 R + 38470 G + 7471 B + 2**15) >> 16``, exactly ``Image.convert("L")``);
   C = 1 -> 3 repeats the channel (``Image.convert("RGB")``).
2. Size: the shorter side is resized to ``img_size`` (``img_size / 0.875`` when ``img_size``
   >= 64), bicubic with antialiasing (torch's, whose kernel is PIL's), width then height, each
   pass rounded to whole pixel values as PIL's 8-bit resize does: mostly within one grey level
   of PIL's pixels (Pillow 13 resamples some tall images height first: a few levels on some
   pixels); then the centre ``img_size x img_size`` is cropped. Below 64 px, images already
   at ``img_size`` are left as they are (a 28 px model takes 28 x 28 images untouched); from
   64 px on, as in evaluation, even those are enlarged by 1 / 0.875 and centre-cropped.
3. Scale to [0, 1], normalise with the training mean/std, run the encoder.

Output: ``float32`` ``(N, feature_dim)`` — the [CLS] embedding after the final norm. Float
input is refused (it would be normalised twice, or scaled wrongly); so are other ranks, channel
counts and values outside 0..255, each with a ``ValueError`` saying what was expected. For the
``nn.Module`` over already normalised ``float32`` ``(N, C, H, W)`` use the PyTorch-flavour model
logged in the same run (version tag ``encoder_uri``). Load-time option:
``model_config={"device": "cuda"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# As pilamim.data.transforms (tests/registry/test_serving.py checks they agree).
EVAL_CROP_RATIO = 0.875
EVAL_RESIZE_MIN = 64
# PIL's RGB -> L weights (ITU-R 601-2 luma) in 1/65536, rounded as Image.convert("L") does.
LUMA_WEIGHTS = (19595, 38470, 7471)


def load_timm_encoder(weights: str | Path, config: Mapping[str, Any]):
    """Rebuild the timm encoder from ``encoder.json`` and load ``encoder.safetensors`` strictly."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(config["model_name"], pretrained=False, **config["kwargs"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def as_image_batch(images: Any) -> np.ndarray:
    """Checked ``uint8`` ``(N, H, W, C)`` from integer pixels ``(N, H, W[, C])`` in 0..255."""
    array = np.asarray(images)
    if array.dtype.kind in "fc":
        raise ValueError(f"expected integer pixels 0..255 (uint8, as PIL/numpy give them), got "
                         f"dtype {array.dtype}: send raw pixels, not scaled or normalised values")
    if array.dtype.kind not in "ui":
        raise ValueError(f"expected integer pixels 0..255 (uint8), got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"expected a batch of images shaped (N, H, W, C) or (N, H, W), got "
                         f"shape {array.shape} (a single image: add the batch axis, x[None])")
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels last (N, H, W, C), got shape "
                         f"{array.shape}")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"images have no pixels: shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"pixel values must lie in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return array


def match_channels(batch: np.ndarray, in_chans: int) -> np.ndarray:
    """``uint8`` ``(N, H, W, C)`` with C made ``in_chans`` the way PIL's ``convert`` does."""
    if batch.shape[-1] == 4:          # RGBA: PIL's convert("RGB") / convert("L") drop alpha
        batch = batch[..., :3]
    chans = batch.shape[-1]
    if chans == in_chans:
        return batch
    if chans == 3 and in_chans == 1:
        rgb = batch.astype(np.int32)
        luma = sum(rgb[..., i] * w for i, w in enumerate(LUMA_WEIGHTS)) + (1 << 15)
        return (luma >> 16).astype(np.uint8)[..., None]
    if chans == 1 and in_chans == 3:
        return np.repeat(batch, 3, axis=-1)
    raise ValueError(f"cannot make {chans}-channel images into the encoder's {in_chans}")


def eval_resize(pixels, img_size: int):
    """Float pixel values (0..255) ``(N, C, H, W)`` -> ``(N, C, img_size, img_size)`` as
    ``Resize(shorter side, bicubic) + CenterCrop(img_size)`` of the evaluation transform."""
    import torch.nn.functional as F

    short_target = int(img_size / EVAL_CROP_RATIO) if img_size >= EVAL_RESIZE_MIN else img_size
    height, width = pixels.shape[-2:]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_target, int(short_target * long / short)
    new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
    # PIL's usual order: a horizontal pass, then a vertical one, each skipped when its size
    # stays and each rounded to whole pixel values (PIL keeps an 8-bit image in between).
    for size in ((height, new_w), (new_h, new_w)):
        if size != tuple(pixels.shape[-2:]):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True,
                                   align_corners=False).add_(0.5).floor_().clamp_(0, 255)
    top, left = int(round((new_h - img_size) / 2.0)), int(round((new_w - img_size) / 2.0))
    return pixels[..., top:top + img_size, left:left + img_size]


def normalise(batch: np.ndarray, mean: Sequence[float], std: Sequence[float], img_size: int,
              device=None):
    """Checked ``uint8`` ``(N, H, W, C)`` (channels already matched) -> the encoder's input:
    resized, cropped, normalised ``float32`` ``(N, C, img_size, img_size)`` on ``device``."""
    import torch

    pixels = np.require(batch, requirements=["C", "W"])   # PIL's arrays are read-only
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float()
    x = eval_resize(x, img_size) / 255.0
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def images_to_tensor(images: Any, mean: Sequence[float], std: Sequence[float], in_chans: int,
                     img_size: int, device=None):
    """Raw pixels (see the module docstring) -> normalised ``float32`` ``(N, C, S, S)``."""
    batch = match_channels(as_image_batch(images), in_chans)
    return normalise(batch, mean, std, img_size, device)


class EncoderEmbedder(PythonModel):
    """Raw integer images -> encoder embeddings (see the module docstring)."""

    batch_size = 256
    # Our explicit tensor signature validates inputs; this skips MLflow's type-hint wrapper
    # (and its "add type hints" warning), which cannot describe numpy image batches.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        self.config = json.loads(Path(context.artifacts["encoder_config"]).read_text())
        device = (context.model_config or {}).get("device")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = load_timm_encoder(context.artifacts["encoder_weights"], self.config)
        self.encoder.to(self.device)

    def predict(self, context, model_input, params=None):
        import torch

        cfg = self.config
        batch = match_channels(as_image_batch(model_input), int(cfg["in_chans"]))
        outputs = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], self.batch_size):
                x = normalise(batch[start:start + self.batch_size], cfg["mean"], cfg["std"],
                              int(cfg["img_size"]), self.device)
                outputs.append(self.encoder(x).float().cpu())
        if not outputs:
            return np.zeros((0, int(cfg["feature_dim"])), np.float32)
        return torch.cat(outputs).numpy()


mlflow.models.set_model(EncoderEmbedder())

"""MLflow pyfunc model: a batch of raw images in, one embedding per image out.

This is the model the registry versions (``models:/<name>@champion``), so
``mlflow models serve -m models:/pilamim-encoder@champion`` takes pixels as PIL/numpy give them
and the caller never needs our mean/std. Logged by
:func:`pilamim.registry.model_logging.log_encoder_model` as a "model from code": MLflow copies
this file into the model and runs it at load time, so it stores no pickle and must stay
self-contained (numpy, PIL, torch, torchvision, timm, safetensors and mlflow only; no
``pilamim`` imports). The weights travel as the model's artifacts ``encoder_weights``
(``encoder.safetensors``) and ``encoder_config`` (``encoder.json``: ``model_name``, ``kwargs``,
``feature_dim``, ``mean``, ``std``, ``img_size``, ``in_chans``) — no pickle involved.

Input: integer pixels in 0..255 (``uint8`` as ``np.asarray(pil_image)`` gives them; any integer
dtype is cast after a range check), shaped ``(N, H, W, C)``; ``(N, H, W)`` (grayscale) is taken
as C = 1. The model's signature declares ``uint8 (-1, -1, -1, -1)``: MLflow's schema
enforcement (``pyfunc.load_model(...).predict`` and the scoring server) checks the rank, so
through MLflow send the 4-D form — ``np.stack(images)[..., None]`` for grayscale; the scoring
server parses JSON ``{"inputs": [...nested lists...]}`` straight to ``uint8`` (refusing values
outside 0..255, but cutting fractions: this model never sees JSON floats). Every image goes the
way the evaluation images went (the numbers the registry's gate compared), with the same
libraries rather than an imitation of them:

1. PIL: ``Image.fromarray`` (C = 1, 3, 4: mode L, RGB, RGBA) then ``convert`` to the encoder's
   mode (L or RGB), as the data loader converts files: RGBA drops alpha, RGB -> L is PIL's
   ITU-R 601-2 luma, L -> RGB repeats the channel.
2. :func:`eval_transform`, torchvision's ``Resize(shorter side, bicubic)`` (on a PIL image:
   PIL's own bicubic resize) + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` with the training
   mean/std — built exactly as ``pilamim.data.transforms.eval_transform`` builds it
   (tests/registry/test_serving.py checks both build the same pipeline and give the same
   numbers). From 64 px on, images are enlarged to ``img_size / 0.875`` and centre-cropped,
   even those already at ``img_size``; below, images at ``img_size`` pass untouched.
3. The encoder, in chunks of :attr:`EncoderEmbedder.batch_size`.

Output: ``float32`` ``(N, feature_dim)`` — the [CLS] embedding after the final norm. Float
input is refused (it would be normalised twice, or scaled wrongly); so are other ranks, channel
counts and values outside 0..255, each with a ``ValueError`` saying what was expected. For the
encoder alone, a plain timm ``nn.Module`` over already normalised ``float32`` ``(N, C, H, W)``,
see :func:`pilamim.registry.model_logging.load_registered_encoder` (it reads this model's two
artifacts; nothing is unpickled). Load-time option: ``model_config={"device": "cuda"}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# As pilamim.data.transforms (tests/registry/test_serving.py checks they agree).
EVAL_CROP_RATIO = 0.875
EVAL_RESIZE_MIN = 64
# The model's artifacts (pyfunc ``artifacts=`` keys) holding encoder.safetensors / .json.
WEIGHTS_ARTIFACT = "encoder_weights"
CONFIG_ARTIFACT = "encoder_config"
# The PIL mode the data loader converts images to, by the encoder's input channels.
PIL_MODES = {1: "L", 3: "RGB"}


def timm_data_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``encoder.json`` as timm's ``pretrained_cfg`` data fields, so that
    ``timm.data.resolve_data_config(model=encoder)`` describes our evaluation input instead of
    the architecture's ImageNet defaults (3 x 224 x 224, mean 0.5: wrong for our encoders)."""
    size = int(config["img_size"])
    return {"input_size": (int(config["in_chans"]), size, size),
            "mean": tuple(config["mean"]), "std": tuple(config["std"]),
            "interpolation": "bicubic", "crop_mode": "center",
            "crop_pct": EVAL_CROP_RATIO if size >= EVAL_RESIZE_MIN else 1.0}


def load_timm_encoder(weights: str | Path, config: Mapping[str, Any]):
    """Rebuild the timm encoder from ``encoder.json`` and load ``encoder.safetensors`` strictly
    (safetensors holds tensors only: nothing is unpickled); eval mode, on the CPU."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(config["model_name"], pretrained=False, **config["kwargs"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    if "mean" in config and "std" in config:
        model.pretrained_cfg = {**model.pretrained_cfg, **timm_data_config(config)}
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


def pil_mode(in_chans: int) -> str:
    """The PIL mode of the encoder's input (L or RGB), as the data loader converts to."""
    if in_chans not in PIL_MODES:
        raise ValueError(f"no PIL mode for an encoder taking {in_chans} channels (1 or 3)")
    return PIL_MODES[in_chans]


def to_pil(image: np.ndarray, mode: str):
    """One checked ``uint8`` ``(H, W, C)`` image as a PIL image in ``mode`` (PIL converts)."""
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert(mode)


def eval_transform(img_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> Callable[[Any], Any]:
    """``pilamim.data.transforms.eval_transform``, built the same way from torchvision (this
    file may not import pilamim): PIL image -> normalised ``float32`` ``(C, S, S)``."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    resize = int(img_size / EVAL_CROP_RATIO) if img_size >= EVAL_RESIZE_MIN else img_size
    return T.Compose([
        T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]),
    ])


def images_to_tensor(images: Any, config: Mapping[str, Any]):
    """Raw pixels (see the module docstring) -> the encoder's input, normalised ``float32``
    ``(N, C, S, S)`` on the CPU, each image through PIL and :func:`eval_transform`."""
    import torch

    batch = as_image_batch(images)
    chans, size = int(config["in_chans"]), int(config["img_size"])
    mode, transform = pil_mode(chans), eval_transform(size, config["mean"], config["std"])
    if batch.shape[0] == 0:
        return torch.zeros((0, chans, size, size))
    return torch.stack([transform(to_pil(image, mode)) for image in batch])


class EncoderEmbedder(PythonModel):
    """Raw integer images -> encoder embeddings (see the module docstring)."""

    batch_size = 256
    # Our explicit tensor signature validates inputs; this skips MLflow's type-hint wrapper
    # (and its "add type hints" warning), which cannot describe numpy image batches.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        self.config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        device = (context.model_config or {}).get("device")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = load_timm_encoder(context.artifacts[WEIGHTS_ARTIFACT], self.config)
        self.encoder.to(self.device)

    def predict(self, context, model_input, params=None):
        import torch

        batch = as_image_batch(model_input)        # every refusal before any work
        outputs = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], self.batch_size):
                x = images_to_tensor(batch[start:start + self.batch_size], self.config)
                outputs.append(self.encoder(x.to(self.device)).float().cpu())
        if not outputs:
            return np.zeros((0, int(self.config["feature_dim"])), np.float32)
        return torch.cat(outputs).numpy()


mlflow.models.set_model(EncoderEmbedder())

import json

import numpy as np
import pytest
import torch
from eval_helpers import CLASSES, ENCODER_KWARGS, write_encoder_dir
from PIL import Image

from pilamim.config import FinetuneParams
from pilamim.evaluate.finetune import (
    EncoderLoadError,
    build_finetune_model,
    build_finetune_optimizer,
    finetune_transform,
    run_finetune,
)
from pilamim.loggers import MemoryLogger
from pilamim.schedules import cosine_with_warmup, set_lr

TINY = dict(epochs=2, warmup_epochs=1, batch_size=16, device="cpu", drop_path=0.1)


def test_model_loads_encoder_with_avg_pool_head(encoder, encoder_dir):
    model = build_finetune_model(encoder_dir, num_classes=4, drop_path=0.1)
    assert model.global_pool == "avg" and model.head.out_features == 4
    assert isinstance(model.norm, torch.nn.Identity) and model.fc_norm.weight.shape == (32,)
    assert model.head.weight.std().item() < 1e-4 and torch.all(model.head.bias == 0)
    loaded = model.state_dict()
    for key, value in encoder.state_dict().items():
        if not key.startswith("norm."):
            torch.testing.assert_close(loaded[key], value)


def test_unexpected_or_missing_keys_are_rejected(tmp_path, encoder):
    state = dict(encoder.state_dict())
    state["decoder.weight"] = torch.zeros(3)
    bad = write_encoder_dir(tmp_path / "extra", encoder, state=state)
    with pytest.raises(EncoderLoadError, match=r"unexpected \['decoder.weight'\]"):
        build_finetune_model(bad, num_classes=4)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("blocks.1.")}
    bad = write_encoder_dir(tmp_path / "missing", encoder, state=state)
    with pytest.raises(EncoderLoadError, match="blocks.1.attn.qkv.weight"):
        build_finetune_model(bad, num_classes=4)
    wider = write_encoder_dir(tmp_path / "shape", encoder,
                              kwargs={**ENCODER_KWARGS, "embed_dim": 64})
    with pytest.raises(EncoderLoadError, match="do not fit"):
        build_finetune_model(wider, num_classes=4)
    with pytest.raises(FileNotFoundError, match="pilamim pretrain"):
        build_finetune_model(tmp_path / "nowhere", num_classes=4)


def test_layer_decay_gives_each_depth_its_own_lr(encoder_dir):
    model = build_finetune_model(encoder_dir, num_classes=4)
    params = FinetuneParams(layer_decay=0.5, weight_decay=0.05)
    opt = build_finetune_optimizer(model, params, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay_of = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    # depth 2: embeddings are layer 0, blocks 1..2, head/fc_norm layer 3 -> 0.5 ** (3 - layer)
    assert scale_of["head.weight"] == 1.0 and scale_of["fc_norm.weight"] == 1.0
    assert scale_of["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale_of["blocks.0.mlp.fc1.weight"] == 0.25
    assert scale_of["pos_embed"] == scale_of["cls_token"] == scale_of["patch_embed.proj.weight"]
    assert scale_of["pos_embed"] == 0.125
    assert decay_of["blocks.0.mlp.fc1.weight"] == 0.05 and decay_of["blocks.0.mlp.fc1.bias"] == 0
    assert decay_of["pos_embed"] == 0.0 and decay_of["cls_token"] == 0.0
    set_lr(opt, 1e-3)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])


def test_schedule_warms_up_then_decays():
    lrs = [cosine_with_warmup(s, total=10, warmup=2, peak=1.0, final=0.1) for s in range(10)]
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] > 0.1


@pytest.mark.parametrize("mix", [(0.8, 1.0), (0.0, 0.0)], ids=["mixup", "plain"])
def test_finetune_runs_and_reports(encoder_dir, splits, mix, capsys):
    params = FinetuneParams(**TINY, mixup=mix[0], cutmix=mix[1], base_lr=5e-3,
                            regularisation="mae")
    logger = MemoryLogger()
    evals = {"val": splits["val"], "test": splits["test"]}
    metrics, model = run_finetune(encoder_dir, splits["train"], evals, CLASSES, params, "cpu",
                                  logger)
    assert metrics["report_split"] == "test" and metrics["top1"] == metrics["test"]["top1"]
    assert set(metrics["val"]) >= {"top1", "top5", "per_class_accuracy", "confusion_matrix",
                                   "loss", "num_samples"}
    assert metrics["steps"] == 2 * (96 // 16) and metrics["batch_size"] == 16
    json.dumps(metrics)
    per_epoch = [(s, m) for s, m in logger.metrics if "finetune/train_loss" in m]
    assert [s for s, _ in per_epoch] == [1, 2]
    assert all({"finetune/lr", "finetune/val_top1", "finetune/val_top5"} <= set(m)
                for _, m in per_epoch)
    assert all("finetune/test_top1" not in m for _, m in per_epoch)
    assert not model.training and model.head.out_features == 4
    # no terminal under pytest: one progress line per epoch instead of the bar
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fine-tune epoch")]
    assert [x.split(":")[0] for x in lines] == ["fine-tune epoch 1/2", "fine-tune epoch 2/2"]
    assert all("train_loss" in x and "val_top1" in x and "img/s, ETA" in x for x in lines)


def test_finetune_learns_deterministically_with_accumulation(encoder_dir, splits):
    params = FinetuneParams(epochs=4, warmup_epochs=1, batch_size=8, accum_steps=2,
                            base_lr=1e-1, mixup=0.0, cutmix=0.0, drop_path=0.0,
                            layer_decay=0.9, device="cpu", seed=1)
    evals = {"val": splits["val"]}
    m1, _ = run_finetune(encoder_dir, splits["train"], evals, CLASSES, params, "cpu")
    m2, _ = run_finetune(encoder_dir, splits["train"], evals, CLASSES, params, "cpu")
    assert m1 == m2
    assert m1["batch_size"] == 16 and m1["steps"] == 4 * (96 // 16)
    # chance is 0.25; avg pooling makes the quadrant task hard for 24 steps (0.59 measured)
    assert m1["top1"] > 0.45, m1


def test_finetune_transform_on_grayscale_28px():
    params = FinetuneParams(regularisation="mae")  # rand-m9-mstd0.5-inc1, reprob 0.25
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L")
    train_tf = finetune_transform(28, [0.29], [0.35], params, train=True)
    for seed in range(60):  # enough draws to hit rotate/shear/translate with a fill colour
        torch.manual_seed(seed)
        out = train_tf(img)
        assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    eval_tf = finetune_transform(28, [0.29], [0.35], params, train=False)
    expected = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0) - 0.29) / 0.35
    torch.testing.assert_close(eval_tf(img)[0], expected)
    # the image mode follows the statistics, so mismatched inputs do not crash RandAugment
    rgb_tf = finetune_transform(28, [0.5] * 3, [0.25] * 3, params, train=True)
    assert all(rgb_tf(img).shape == (3, 28, 28) for _ in range(20))
    assert train_tf(img.convert("RGB")).shape == (1, 28, 28)


def test_finetune_eval_transform_center_crops_large_images():
    tf = finetune_transform(64, [0.5], [0.5], FinetuneParams(), train=False)
    assert tf(Image.new("L", (100, 80))).shape == (1, 64, 64)


class _PilDataset(torch.utils.data.Dataset):
    """Grayscale PIL images through a transform, the way the data package feeds fine-tuning."""

    def __init__(self, base, transform):
        self.images = [Image.fromarray((x[0].clamp(-1, 3) * 60 + 60).byte().numpy(), mode="L")
                       for x, _ in base]
        self.labels = [int(y) for _, y in base]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def test_finetune_end_to_end_on_pil_images_with_randaugment(encoder_dir, splits):
    params = FinetuneParams(**{**TINY, "epochs": 1, "warmup_epochs": 0}, regularisation="mae")
    train_tf = finetune_transform(16, [0.3], [0.3], params, train=True)
    eval_tf = finetune_transform(16, [0.3], [0.3], params, train=False)
    train = _PilDataset(splits["train"], train_tf)
    metrics, _ = run_finetune(encoder_dir, train, {"val": _PilDataset(splits["val"], eval_tf)},
                              CLASSES, params, "cpu")
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["val"]["num_samples"] == 32


def test_randaugment_posterize_to_zero_bits_does_not_crash():
    """timm's inc1 posterize can ask Pillow >= 12 for 0 bits; the transform must survive it."""
    from PIL import Image
    from timm.data import auto_augment

    img = Image.new("L", (28, 28), 200)
    posterize = auto_augment.NAME_TO_OP["PosterizeIncreasing"]
    params = FinetuneParams(**TINY, regularisation="mae")
    tf = finetune_transform(28, (0.5,), (0.5,), params, train=True)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", [])
           if op.name.startswith("Posterize")]
    assert ops and all(op.aug_fn is not posterize for op in ops)
    assert ops[0].aug_fn(img, 0).getextrema() == (0, 0)

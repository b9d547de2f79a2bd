import pytest
import torch
from eval_helpers import CLASSES
from timm.optim import Lars
from torch.utils.data import TensorDataset

from pilamim.config import ProbeParams
from pilamim.evaluate.features import extract_features
from pilamim.evaluate.linear_probe import (
    build_probe_head,
    build_probe_optimizer,
    load_probe_head,
    run_linear_probe,
    select_candidate,
)
from pilamim.loggers import MemoryLogger

# Few samples, few steps: LARS's trust ratio (0.001 x |w| / |g|) needs a large lr to move;
# lr = 100 x 16 / 256 = 6.25 is MAE's effective probe lr (0.1 x 16384 / 256 = 6.4).
FAST = dict(epochs=40, warmup_epochs=5, batch_size=16, base_lr=100.0, device="cpu")


def test_head_shape_and_init():
    torch.manual_seed(0)
    head = build_probe_head(384, 10)
    bn, linear = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert (linear.in_features, linear.out_features) == (384, 10)
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(linear.bias == 0)
    assert sum(p.numel() for p in head.parameters()) == 384 * 10 + 10


def test_lars_adapts_only_the_weight_matrix():
    head = build_probe_head(8, 3)
    opt = build_probe_optimizer(head, "lars", 0.1, 1e-4)
    assert isinstance(opt, Lars)
    weight_group, bias_group = opt.param_groups
    assert weight_group["always_adapt"] and weight_group["weight_decay"] == 1e-4
    assert not bias_group["always_adapt"] and bias_group["weight_decay"] == 0.0
    assert isinstance(build_probe_optimizer(head, "sgd", 0.1, 0.0), torch.optim.SGD)


def test_features_are_cls_after_norm(encoder, splits):
    feats, labels = extract_features(encoder, splits["val"], batch_size=10, device="cpu")
    assert feats.shape == (32, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(labels, splits["val"].tensors[1])
    with torch.no_grad():
        tokens = encoder.forward_features(splits["val"].tensors[0])
    torch.testing.assert_close(feats, tokens[:, 0])
    assert feats.requires_grad is False and not feats.is_inference()


def test_probe_learns_and_is_deterministic(encoder, splits, tmp_path, capsys):
    params = ProbeParams(**FAST, seed=3)
    evals = {"val": splits["val"], "test": splits["test"]}
    logger = MemoryLogger()
    m1 = run_linear_probe(encoder, splits["train"], evals, CLASSES, params, "cpu", logger,
                          head_path=tmp_path / "h1.pt")
    m2 = run_linear_probe(encoder, splits["train"], evals, CLASSES, params, "cpu",
                          head_path=tmp_path / "h2.pt")
    assert m1["top1"] == m1["test"]["top1"] and m1["report_split"] == "test"
    assert m1["top1"] > 0.75, m1  # chance is 0.25
    assert m1["knn_top1"] == m1["test"]["knn_top1"]
    assert m1 == m2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("linear probe epoch")]
    assert lines and all("train_loss" in x and "val_top1" in x for x in lines)
    h1, classes = load_probe_head(tmp_path / "h1.pt")
    h2, _ = load_probe_head(tmp_path / "h2.pt")
    assert classes == CLASSES
    for a, b in zip(h1.state_dict().values(), h2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # per-epoch logging: steps 1..epochs, val only (test is never watched during training)
    per_epoch = [(s, m) for s, m in logger.metrics if "probe/train_loss" in m]
    assert [s for s, _ in per_epoch] == list(range(1, params.epochs + 1))
    assert all("probe/val_top1" in m and "probe/test_top1" not in m for _, m in per_epoch)
    assert logger.series("probe/train_loss")[-1] < 0.5 * logger.series("probe/train_loss")[0]
    assert logger.metrics[-1][1]["probe/test_top1"] == m1["top1"]
    # a different seed gives a different run
    m3 = run_linear_probe(encoder, splits["train"], evals, CLASSES,
                          ProbeParams(**FAST, seed=4), "cpu")
    assert m3["train_loss"] != m1["train_loss"]


def test_probe_with_sgd_and_without_test_split(encoder, splits):
    params = ProbeParams(**{**FAST, "base_lr": 0.5}, optimizer="sgd")
    m = run_linear_probe(encoder, splits["train"], {"val": splits["val"]}, CLASSES, params, "cpu")
    assert m["report_split"] == "val" and m["top1"] == m["val"]["top1"] > 0.6


def test_probe_augment_mode_runs_encoder_each_step(encoder, splits):
    calls = []
    was_training = encoder.training
    hook = encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        params = ProbeParams(**{**FAST, "epochs": 2, "warmup_epochs": 1, "batch_size": 32},
                             augment=True)
        m = run_linear_probe(encoder, splits["train"], {"val": splits["val"]}, CLASSES,
                             params, "cpu")
        assert "knn_top1" not in m  # augmented memory bank: kNN only with knn_train_ds
        cached = len(calls)
        m = run_linear_probe(encoder, splits["train"], {"val": splits["val"]}, CLASSES,
                             params, "cpu", knn_train_ds=splits["train"])
        assert "knn_top1" in m["val"]
    finally:
        hook.remove()
    # 1 val batch + 2 epochs x 3 training batches of 32
    assert cached == 1 + 2 * 3
    assert encoder.training == was_training  # the caller's train/eval mode is given back


def _relabelled(ds: TensorDataset, shift: int) -> TensorDataset:
    images, labels = ds.tensors
    return TensorDataset(images, (labels + shift) % len(CLASSES))


def test_probe_grid_chooses_on_val_and_uses_test_once(encoder, splits):
    """One head per (base_lr, weight_decay); the best val top-1 is kept. Test labels play no
    part in the choice: scrambling them changes the test numbers only."""
    params = ProbeParams(**{**FAST, "base_lr": [0.01, 100.0], "weight_decay": [0.0, 1e-4]})
    evals = {"val": splits["val"], "test": splits["test"]}
    logger = MemoryLogger()
    m = run_linear_probe(encoder, splits["train"], evals, CLASSES, params, "cpu", logger)
    grid = m["candidates"]
    assert [(c["base_lr"], c["weight_decay"]) for c in grid] == [
        (0.01, 0.0), (0.01, 1e-4), (100.0, 0.0), (100.0, 1e-4)]
    best = grid[select_candidate([c["val_top1"] for c in grid])]
    assert (m["base_lr"], m["weight_decay"]) == (best["base_lr"], best["weight_decay"])
    assert m["base_lr"] == 100.0  # lr 0.01 x 16 / 256 barely moves a LARS head in 40 epochs
    assert m["val"]["top1"] == best["val_top1"] > grid[0]["val_top1"]
    assert logger.metrics[-1][1]["probe/base_lr"] == m["base_lr"]
    # only the kept head's curve is logged: one row per epoch, no test
    per_epoch = [s for s, row in logger.metrics if "probe/train_loss" in row]
    assert per_epoch == list(range(1, params.epochs + 1))
    assert not any("probe/test_top1" in row for s, row in logger.metrics[:-1])

    # a grid entry trains exactly the head a run with that single value would
    alone = run_linear_probe(encoder, splits["train"], evals, CLASSES,
                             ProbeParams(**{**FAST, "base_lr": 100.0, "weight_decay": 1e-4}),
                             "cpu")
    assert alone["val"]["top1"] == grid[3]["val_top1"]

    scrambled = {"val": splits["val"], "test": _relabelled(splits["test"], 1)}
    m2 = run_linear_probe(encoder, splits["train"], scrambled, CLASSES, params, "cpu")
    assert m2["candidates"] == grid and m2["base_lr"] == m["base_lr"]
    assert m2["val"] == m["val"] and m2["test"]["top1"] != m["test"]["top1"]


def test_probe_grid_needs_a_val_split(encoder, splits):
    params = ProbeParams(**{**FAST, "base_lr": [1.0, 10.0]})
    with pytest.raises(ValueError, match="val_fraction"):
        run_linear_probe(encoder, splits["train"], {"test": splits["test"]}, CLASSES, params,
                         "cpu")


def test_select_candidate_prefers_the_first_of_a_tie():
    assert select_candidate([0.5, 0.7, 0.7, 0.1]) == 1
    assert select_candidate([0.3]) == 0


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_probe_extracts_features_in_its_own_precision(encoder, splits, monkeypatch, precision,
                                                      dtype):
    """probe.precision: fp32 gives features that do not depend on the CPU's bf16 support."""
    from pilamim.evaluate import linear_probe

    seen = []
    real = linear_probe.extract_features

    def spy(*args, **kwargs):
        seen.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_probe, "extract_features", spy)
    run_linear_probe(encoder, splits["train"], {"val": splits["val"]}, CLASSES,
                     ProbeParams(**FAST, precision=precision), "cpu")
    assert seen and set(seen) == {dtype}


def test_an_option_added_at_its_neutral_value_keeps_the_eval_protocol():
    """Versions probed before probe.precision existed stay comparable with new ones."""
    import hashlib
    import json

    from pilamim.stages.lineage import NOT_PROTOCOL, eval_protocol

    params = ProbeParams()
    before = {k: v for k, v in params.model_dump(mode="json").items()
              if k not in NOT_PROTOCOL and k != "precision"}
    text = json.dumps(before, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    assert eval_protocol("probe", params) == f"probe:{digest}"
    assert eval_protocol("probe", params.model_copy(update={"precision": "fp32"})) != \
        eval_protocol("probe", params)

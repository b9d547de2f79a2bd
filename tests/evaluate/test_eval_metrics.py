import json

import pytest
import torch

from pilamim.evaluate.metrics import (
    classification_metrics,
    save_confusion_matrix_png,
    topk_accuracy,
)
from pilamim.io import atomic_write_json


def test_hand_made_logits_give_exact_metrics():
    classes = ["a", "b", "c"]
    logits = torch.tensor([
        [3.0, 2.0, 1.0],  # true a, pred a
        [1.0, 3.0, 2.0],  # true a, pred b
        [1.0, 3.0, 2.0],  # true b, pred b
        [3.0, 1.0, 2.0],  # true c, pred a
    ])
    labels = torch.tensor([0, 0, 1, 2])
    m = classification_metrics(logits, labels, classes)
    assert m["top1"] == pytest.approx(0.5)
    assert m["top5"] == 1.0  # k = min(5, 3) covers every class
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert m["num_samples"] == 4
    json.dumps(m)  # plain Python, JSON-ready


def test_top5_with_more_classes_and_empty_class():
    classes = [str(i) for i in range(7)]
    logits = torch.arange(7.0).repeat(3, 1)  # ranking 6 > 5 > 4 > 3 > 2 > 1 > 0
    labels = torch.tensor([6, 2, 1])  # top1 hit, top5 hit (rank 5), miss (rank 6)
    m = classification_metrics(logits, labels, classes)
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(1 / 3)
    assert m["per_class_accuracy"]["0"] is None  # no samples: None, never NaN


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="classes"):
        classification_metrics(torch.zeros(2, 3), torch.zeros(2), ["a", "b"])


def test_png_and_json_written_atomically(tmp_path):
    png = save_confusion_matrix_png([[3, 1], [0, 4]], ["x", "y"], tmp_path / "fig" / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = atomic_write_json(tmp_path / "m.json", {"top1": 0.5, "top5": 1.0})
    assert json.loads(path.read_text()) == {"top1": 0.5, "top5": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig", "m.json"]  # no temp files left

import math

import pytest
import torch
from eval_helpers import CLASSES

from pilamim.evaluate.knn import knn_classify, knn_metrics, run_knn


def test_known_small_case_exact():
    train = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_classify(train, labels, query, num_classes=2, k=3, temperature=0.5)
    # cosine sims: 1, 1, 0, 1/sqrt(2); the 3 nearest are the two class-0 points and [1, 1]
    expected = torch.tensor([[2 * math.exp(1 / 0.5), math.exp((1 / math.sqrt(2)) / 0.5)]])
    torch.testing.assert_close(scores, expected)


def test_separable_features_are_classified_perfectly():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=gen) * 5
    train_y = torch.arange(200) % 5
    query_y = torch.arange(50) % 5
    train = centers[train_y] + 0.1 * torch.randn(200, 16, generator=gen)
    query = centers[query_y] + 0.1 * torch.randn(50, 16, generator=gen)
    m = knn_metrics(train, train_y, query, query_y, num_classes=5)
    assert m == {"knn_top1": 1.0, "knn_top5": 1.0}
    # chunking changes memory use, not results; k larger than the bank is capped
    full = knn_classify(train, train_y, query, 5, k=500, chunk=1024)
    torch.testing.assert_close(knn_classify(train, train_y, query, 5, k=500, chunk=7), full)


def test_run_knn_on_datasets(encoder, splits):
    m = run_knn(encoder, splits["train"], splits["val"], CLASSES, k=5, batch_size=32)
    assert m["knn_top1"] == m["top1"] and m["num_samples"] == 32
    assert m["knn_top1"] > 0.5  # chance is 0.25


def test_empty_bank_is_an_error():
    with pytest.raises(ValueError):
        knn_classify(torch.zeros(0, 3), torch.zeros(0), torch.zeros(1, 3), 2)

import pytest

from pilamim.schedules import cosine_with_warmup, linear


def test_lr_warmup_then_cosine():
    f = lambda s: cosine_with_warmup(s, total=100, warmup=10, peak=1.0, final=0.0)  # noqa: E731
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)
    assert cosine_with_warmup(100, 100, 10, 1.0, final=0.1) == pytest.approx(0.1)


def test_ema_momentum_linear_from_0996_to_1():
    assert linear(0, 1000, 0.996, 1.0) == 0.996
    assert linear(500, 1000, 0.996, 1.0) == pytest.approx(0.998)
    assert linear(1000, 1000, 0.996, 1.0) == 1.0
    assert linear(2000, 1000, 0.996, 1.0) == 1.0

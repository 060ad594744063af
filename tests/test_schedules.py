"""Learning-rate factors: literal values, and the cosine equals recipes/sft.py's former inline lambda."""

import math

import pytest

from rlprims.schedules import constant_lr_factor, cosine_lr_factor, is_due


def test_constant_with_warmup():
    f = [constant_lr_factor(s, warmup_steps=4, total_steps=10, min_lr_ratio=0.0) for s in range(6)]
    assert f == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert constant_lr_factor(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0


def test_cosine_with_warmup_and_floor():
    kw = dict(warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    assert cosine_lr_factor(1, **kw) == 0.5
    assert cosine_lr_factor(2, **kw) == 1.0
    assert cosine_lr_factor(4, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(π/2) = 0
    assert cosine_lr_factor(6, **kw) == pytest.approx(0.1)
    assert cosine_lr_factor(60, **kw) == pytest.approx(0.1)  # held after the end
    for s in range(10):
        w, total, rho = 3, 9, 0.2  # recipes/sft.py's lambda
        cos = 0.5 * (1 + math.cos(math.pi * min((s - w) / (total - w), 1.0)))
        ref = s / w if s < w else rho + (1 - rho) * cos
        assert cosine_lr_factor(s, warmup_steps=w, total_steps=total, min_lr_ratio=rho) == pytest.approx(ref)


def test_bad_input():
    with pytest.raises(ValueError, match="step"):
        cosine_lr_factor(-1, warmup_steps=0, total_steps=1, min_lr_ratio=0.0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        constant_lr_factor(0, warmup_steps=0, total_steps=1, min_lr_ratio=2.0)


def test_is_due():
    due = lambda every: [s for s in range(1, 8) if is_due(s, every=every, last=7)]  # noqa: E731
    assert due(3) == [3, 6, 7] and due(1) == [1, 2, 3, 4, 5, 6, 7] and due(7) == [7] and due(10) == [7]
    assert due(0) == [7] and due(-1) == []
    with pytest.raises(ValueError, match="every"):
        is_due(1, every=2.0, last=3)

"""Tests for rlprims/ops/dapo.py: dynamic-sampling keep mask and overlong penalty."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from rlprims.ops.advantages import drgrpo_advantages
from rlprims.ops.dapo import nonzero_variance_group_mask, overlong_penalty
from tests.tolerances import EXACT


def test_keep_mask_literal():
    # groups of 3: [1, 1, 0] varies -> keep; [0.1, 0.1, 0.1] equal -> drop; [0, 0, 0] equal -> drop;
    # [2, 3, 2] varies -> keep.
    scores = torch.tensor([1.0, 1.0, 0.0, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 2.0, 3.0, 2.0])
    expected = torch.tensor([True] * 3 + [False] * 6 + [True] * 3)
    assert torch.equal(nonzero_variance_group_mask(scores, group_size=3), expected)


def test_keep_mask_equal_non_representable_scores_dropped():
    # Three float64 copies of 0.1: np.std gives 1.4e-17 > 0, so verl's `std > 0` test keeps the group;
    # max == min is exact, so the group is dropped.
    assert not nonzero_variance_group_mask(torch.full((3,), 0.1, dtype=torch.float64), group_size=3).any()


def test_keep_mask_singletons_kept():
    # verl keeps single-response groups (`std > 0 or len == 1`).
    assert nonzero_variance_group_mask(torch.tensor([0.0, 0.0, 1.0]), group_size=1).all()


@given(
    n=st.integers(2, 4),
    groups=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_keep_mask_marks_groups_with_nonzero_group_advantage(n, groups, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.tensor([0.1, 0.7, 1.0])[torch.randint(0, 3, (n * groups,), generator=g)]
    keep = nonzero_variance_group_mask(scores, group_size=n)
    adv = drgrpo_advantages(scores, torch.ones(n * groups, 1, dtype=torch.bool), group_size=n)
    informative = (adv.reshape(groups, n) != 0).any(dim=-1).repeat_interleave(n)
    assert torch.equal(keep, informative)
    assert keep.dtype == torch.bool and keep.shape == scores.shape


@pytest.mark.parametrize(
    "scores, n, arg",
    [
        (torch.zeros(4), 3, "group_size"),
        (torch.zeros(4), 0, "group_size"),
        (torch.zeros(4, 1), 2, "scores"),
        (torch.tensor([0.0, float("nan")]), 2, "scores"),
        (torch.tensor([0, 1]), 2, "scores"),
    ],
)
def test_keep_mask_bad_inputs(scores, n, arg):
    with pytest.raises(ValueError, match=arg):
        nonzero_variance_group_mask(scores, group_size=n)


def test_overlong_penalty_literal():
    # Lmax = 20, b = 8, f = 0.5: no penalty up to Lmax − b = 12, then −(L − 12)/8 · 0.5.
    #   L = 0, 12 -> 0;  14 -> −2/8·0.5 = −0.125;  20 -> −8/8·0.5 = −0.5;
    #   25 (> Lmax) -> −0.5 (capped)
    lengths = torch.tensor([0, 12, 14, 20, 25])
    out = overlong_penalty(lengths, max_response_length=20, overlong_buffer_len=8, penalty_factor=0.5)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([0.0, 0.0, -0.125, -0.5, -0.5]), **EXACT)
    assert not torch.signbit(out[:2]).any()  # +0.0, not −0.0, where there is no penalty


def test_overlong_penalty_buffer_equals_max_and_float_lengths():
    # b = Lmax = 10, f = 1: every token is in the buffer: −L/10.  float64 input keeps float64.
    lengths = torch.tensor([0.0, 5.0, 10.0], dtype=torch.float64)
    out = overlong_penalty(lengths, max_response_length=10, overlong_buffer_len=10, penalty_factor=1.0)
    assert out.dtype == torch.float64
    assert_close(out, torch.tensor([0.0, -0.5, -1.0], dtype=torch.float64), **EXACT)


@given(
    lmax=st.integers(1, 64),
    data=st.data(),
    factor=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_overlong_penalty_bounded_and_monotone(lmax, data, factor):
    b = data.draw(st.integers(1, lmax))
    lengths = torch.arange(0, 2 * lmax + 1)
    out = overlong_penalty(lengths, max_response_length=lmax, overlong_buffer_len=b, penalty_factor=factor)
    assert torch.isfinite(out).all()
    assert (out <= 0).all() and (out >= -factor).all()
    assert (out[1:] <= out[:-1]).all()  # longer is never rewarded more
    assert (out[: lmax - b + 1] == 0).all()  # no penalty up to Lmax − b
    assert_close(out[lmax], torch.tensor(-factor), **EXACT)  # full penalty at Lmax


@pytest.mark.parametrize(
    "lengths, kwargs, arg",
    [
        (
            torch.tensor([1, 2]),
            {"max_response_length": 10, "overlong_buffer_len": 11, "penalty_factor": 1.0},
            "overlong_buffer_len",
        ),
        (
            torch.tensor([1, 2]),
            {"max_response_length": 10, "overlong_buffer_len": 0, "penalty_factor": 1.0},
            "overlong_buffer_len",
        ),
        (
            torch.tensor([1, 2]),
            {"max_response_length": 10.0, "overlong_buffer_len": 4, "penalty_factor": 1.0},
            "max_response_length",
        ),
        (
            torch.tensor([1, 2]),
            {"max_response_length": 0, "overlong_buffer_len": 4, "penalty_factor": 1.0},
            "max_response_length",
        ),
        (
            torch.tensor([1, 2]),
            {"max_response_length": 10, "overlong_buffer_len": 4, "penalty_factor": -1.0},
            "penalty_factor",
        ),
        (
            torch.tensor([1, -2]),
            {"max_response_length": 10, "overlong_buffer_len": 4, "penalty_factor": 1.0},
            "response_lengths",
        ),
        (
            torch.tensor([[1, 2]]),
            {"max_response_length": 10, "overlong_buffer_len": 4, "penalty_factor": 1.0},
            "response_lengths",
        ),
        (
            torch.tensor([1.0, float("nan")]),
            {"max_response_length": 10, "overlong_buffer_len": 4, "penalty_factor": 1.0},
            "response_lengths",
        ),
        (
            torch.tensor([True, False]),
            {"max_response_length": 10, "overlong_buffer_len": 4, "penalty_factor": 1.0},
            "response_lengths",
        ),
        (
            [1, 2],
            {"max_response_length": 10, "overlong_buffer_len": 4, "penalty_factor": 1.0},
            "response_lengths",
        ),
    ],
)
def test_overlong_penalty_bad_inputs(lengths, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        overlong_penalty(lengths, **kwargs)

"""Tests for rlprims/ops/advantages.py: literal examples, identities, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from rlprims.ops.advantages import (
    drgrpo_advantages,
    gae_advantages,
    gae_advantages_unwhitened,
    gpg_advantages,
    grpo_advantages,
    grpo_passk_advantages,
    opo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from rlprims.ops.reduce import masked_whiten
from tests.tolerances import EXACT, REORDER

NAN, INF = float("nan"), float("inf")
T_, F_ = True, False


def t32(x):
    return torch.tensor(x, dtype=torch.float32)


def bmask(x):
    return torch.tensor(x, dtype=torch.bool)


def whiten_list(xs):
    """(x − μ)/sqrt(σ²_unbiased + 1e-8) in float64, for writing expected values."""
    mu = sum(xs) / len(xs)
    var = sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)
    return [(x - mu) / math.sqrt(var + 1e-8) for x in xs]


# ----------------------------------------------------------------------------------------------------
# Literal examples


def test_gae_unwhitened_literal_with_hole_and_padding():
    # Row 0: valid t = 0, 1, 3; t = 2 is a hole (NaN reward/value there must be skipped). γ = λ = 0.5.
    #   t=3: δ = 2 + 0.5·0 − 1 = 1;              A3 = 1
    #   t=1: δ = 1 + 0.5·V3(=1) − 2 = −0.5;      A1 = −0.5 + 0.25·A3 = −0.25
    #   t=0: δ = 0 + 0.5·V1(=2) − 1 = 0;         A0 = 0 + 0.25·A1 = −0.0625
    #   R = A + V = [0.9375, 1.75, 0, 2]
    # Row 1: only t = 0 valid (right padding with inf): δ = 1 − 0.5 = 0.5; A = 0.5; R = 1.
    rewards = t32([[0.0, 1.0, NAN, 2.0], [1.0, INF, 7.0, 0.0]])
    values = t32([[1.0, 2.0, NAN, 1.0], [0.5, 3.0, -INF, 9.0]])
    mask = bmask([[T_, T_, F_, T_], [T_, F_, F_, F_]])
    out = gae_advantages_unwhitened(rewards, values, mask, gamma=0.5, lam=0.5)
    assert_close(out.advantages, t32([[-0.0625, -0.25, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0]]), **EXACT)
    assert_close(out.returns, t32([[0.9375, 1.75, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]]), **EXACT)


def test_gae_whitened_literal():
    # Same inputs; valid advantages {−0.0625, −0.25, 1, 0.5, 0.5}:
    #   μ = 1.6875/5 = 0.3375, whitened with unbiased variance and eps 1e-8 (verl masked_whiten).
    rewards = t32([[0.0, 1.0, NAN, 2.0], [1.0, INF, 7.0, 0.0]])
    values = t32([[1.0, 2.0, NAN, 1.0], [0.5, 3.0, -INF, 9.0]])
    mask = bmask([[T_, T_, F_, T_], [T_, F_, F_, F_]])
    out = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    a0, a1, a3, b0 = whiten_list([-0.0625, -0.25, 1.0, 0.5])
    assert_close(out.advantages, t32([[a0, a1, 0.0, a3], [b0, 0.0, 0.0, 0.0]]), **EXACT)
    # returns are computed before whitening
    assert_close(out.returns, t32([[0.9375, 1.75, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]]), **EXACT)


def test_gae_lam0_is_td_error():
    # λ = 0: A_t = δ_t = r_t + γ V_{t+1} − V_t.  γ = 0.9, V = [1, 2, 3], r = [0, 0, 1]:
    #   δ = [0 + 1.8 − 1, 0 + 2.7 − 2, 1 + 0 − 3] = [0.8, 0.7, −2]
    out = gae_advantages_unwhitened(
        t32([[0.0, 0.0, 1.0]]), t32([[1.0, 2.0, 3.0]]), bmask([[T_] * 3]), gamma=0.9, lam=0.0
    )
    assert_close(out.advantages, t32([[0.8, 0.7, -2.0]]), **EXACT)


def test_reinforce_pp_literal():
    # γ = 0.5. Row 0 r = [0, 0, 1] all valid: G = [0.25, 0.5, 1].
    # Row 1 r = [1, NaN, 2] with a hole at t=1: G1 carried across: G = [1 + 0.5·2, -, 2] = [2, 0, 2].
    # Whitened over {0.25, 0.5, 1, 2, 2}.
    rewards = t32([[0.0, 0.0, 1.0], [1.0, NAN, 2.0]])
    mask = bmask([[T_, T_, T_], [T_, F_, T_]])
    out = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert_close(out.returns, t32([[0.25, 0.5, 1.0], [2.0, 0.0, 2.0]]), **EXACT)
    w = whiten_list([0.25, 0.5, 1.0, 2.0, 2.0])
    assert_close(out.advantages, t32([[w[0], w[1], w[2]], [w[3], 0.0, w[4]]]), **EXACT)


def _reset_at_mask_returns(rewards, mask, gamma):
    """verl's REINFORCE++ recursion: the running return is zeroed at every masked position."""
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
        running = torch.where(mask[:, t], running, torch.zeros_like(running))
    return torch.where(mask, out, torch.zeros_like(out))


def test_reinforce_pp_matches_verl_reset_for_right_padding():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 7, generator=g)
    lengths = torch.tensor([0, 1, 3, 7, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    out = reinforce_pp_advantages(rewards, mask, gamma=0.9)
    assert_close(out.returns, _reset_at_mask_returns(rewards, mask, 0.9), **EXACT)
    # With a hole the two differ (documented departure): verl cuts the return at the hole.
    hole = bmask([[T_, F_, T_]])
    ours = reinforce_pp_advantages(t32([[0.0, 0.0, 1.0]]), hole, gamma=1.0).returns
    assert_close(ours, t32([[1.0, 0.0, 1.0]]), **EXACT)
    assert_close(_reset_at_mask_returns(t32([[0.0, 0.0, 1.0]]), hole, 1.0), t32([[0.0, 0.0, 1.0]]), **EXACT)


def test_remax_literal():
    # r = [0, 1, NaN(hole), 2], b = 0.5: G = [3, 3, -, 2]; A = G − 0.5 = [2.5, 2.5, -, 1.5].
    # Row 1 empty response: all 0.
    rewards = t32([[0.0, 1.0, NAN, 2.0], [5.0, 5.0, 5.0, 5.0]])
    mask = bmask([[T_, T_, F_, T_], [F_] * 4])
    out = remax_advantages(rewards, mask, t32([0.5, 1.0]))
    assert_close(out.returns, t32([[3.0, 3.0, 0.0, 2.0], [0.0] * 4]), **EXACT)
    assert_close(out.advantages, t32([[2.5, 2.5, 0.0, 1.5], [0.0] * 4]), **EXACT)


# Outcome estimators share one example: group_size 4, scores [1, 0, 1, 1] and a constant group of 0.1.
SCORES = t32([1.0, 0.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1])
LENGTHS = torch.tensor([3, 1, 2, 0, 3, 3, 1, 2])
MASK = torch.arange(3)[None, :] < LENGTHS[:, None]


def broadcast(per_seq, mask=MASK):
    return torch.where(mask, t32(per_seq)[:, None], torch.zeros(()))


def test_grpo_literal():
    # group 0: mean 0.75, unbiased std sqrt((3·0.25² + 0.75²)/3) = sqrt(0.25) = 0.5
    #   A = [0.25, −0.75, 0.25, 0.25] / (0.5 + 1e-6); group 1 constant -> exactly 0.
    out = grpo_advantages(SCORES, MASK, group_size=4)
    d = 0.5 + 1e-6
    assert_close(out, broadcast([0.25 / d, -0.75 / d, 0.25 / d, 0.25 / d, 0, 0, 0, 0]), **EXACT)
    assert torch.equal(out[4:], torch.zeros(4, 3))


def test_grpo_singleton_and_pair():
    # group_size 1: mean 0, std 1 -> A = r / (1 + 1e-6) (verl).
    m = bmask([[T_, T_], [T_, F_]])
    assert_close(
        grpo_advantages(t32([2.0, -1.0]), m, group_size=1),
        t32([[2 / (1 + 1e-6)] * 2, [-1 / (1 + 1e-6), 0]]),
        **EXACT,
    )
    # pair [1, 0]: mean 0.5, std sqrt(0.5) -> ±0.5/(0.70710678 + 1e-6)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert_close(grpo_advantages(t32([1.0, 0.0]), m, group_size=2), t32([[a, a], [-a, 0.0]]), **EXACT)


def test_drgrpo_literal():
    # group 0: r − 0.75 = [0.25, −0.75, 0.25, 0.25]; group 1: 0. Singleton: r unchanged.
    assert_close(
        drgrpo_advantages(SCORES, MASK, group_size=4),
        broadcast([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]),
        **EXACT,
    )
    assert_close(drgrpo_advantages(SCORES, MASK, group_size=1), broadcast(SCORES.tolist()), **EXACT)


def test_rloo_literal():
    # leave-one-out: r0 − mean(0, 1, 1) = 1 − 2/3 = 1/3;  r1 − mean(1, 1, 1) = −1; group 1: 0.
    assert_close(
        rloo_advantages(SCORES, MASK, group_size=4), broadcast([1 / 3, -1, 1 / 3, 1 / 3, 0, 0, 0, 0]), **EXACT
    )
    # singleton: r unchanged (verl)
    assert_close(rloo_advantages(SCORES, MASK, group_size=1), broadcast(SCORES.tolist()), **EXACT)


def test_reinforce_pp_baseline_literal():
    # group_size 2, scores [1, 0, 3, 3], lengths [2, 1, 1, 0]: centred [0.5, −0.5, 0, 0].
    # valid tokens {0.5, 0.5, −0.5, 0} are whitened; the zero-variance group becomes −μ/σ, not 0 (verl).
    mask = torch.arange(3)[None, :] < torch.tensor([2, 1, 1, 0])[:, None]
    out = reinforce_pp_baseline_advantages(t32([1.0, 0.0, 3.0, 3.0]), mask, group_size=2)
    w = whiten_list([0.5, 0.5, -0.5, 0.0])
    assert_close(out, t32([[w[0], w[1], 0], [w[2], 0, 0], [w[3], 0, 0], [0, 0, 0]]), **EXACT)


def test_opo_literal():
    # group [1, 0] with lengths [3, 1]: b = (3·1 + 1·0)/4 = 0.75 -> A = [0.25, −0.75].
    # group [2, 4] with lengths [0, 0]: no tokens at all -> output 0 (baseline would be 0/0 in verl).
    mask = torch.arange(3)[None, :] < torch.tensor([3, 1, 0, 0])[:, None]
    out = opo_advantages(t32([1.0, 0.0, 2.0, 4.0]), mask, group_size=2)
    assert_close(out, t32([[0.25] * 3, [-0.75, 0, 0], [0] * 3, [0] * 3]), **EXACT)
    # SCORES example: lengths [3, 1, 2, 0] -> b = (3 + 0 + 2 + 0)/6 = 5/6; group 1 constant -> 0.
    b = 5 / 6
    assert_close(
        opo_advantages(SCORES, MASK, group_size=4), broadcast([1 - b, -b, 1 - b, 1 - b, 0, 0, 0, 0]), **EXACT
    )
    # singleton: b = 0 (verl)
    assert_close(opo_advantages(SCORES, MASK, group_size=1), broadcast(SCORES.tolist()), **EXACT)


def test_gpg_literal():
    # SCORES: 7 nonzero of B = 8 -> α = 8/7; A = α · [0.25, −0.75, 0.25, 0.25, 0, 0, 0, 0].
    a = 8 / 7
    assert_close(
        gpg_advantages(SCORES, MASK, group_size=4),
        broadcast([a * 0.25, -a * 0.75, a * 0.25, a * 0.25, 0, 0, 0, 0]),
        **EXACT,
    )
    # singletons [2, 0, 1]: mean 0, α = 3/2 -> [3, 0, 1.5]
    m = torch.ones(3, 2, dtype=torch.bool)
    assert_close(
        gpg_advantages(t32([2.0, 0.0, 1.0]), m, group_size=1), t32([[3.0] * 2, [0.0] * 2, [1.5] * 2]), **EXACT
    )
    # all scores 0: every advantage is 0 (α's denominator clamps to 1)
    assert torch.equal(
        gpg_advantages(torch.zeros(4), m[:1].expand(4, 2).clone(), group_size=2), torch.zeros(4, 2)
    )


def test_grpo_passk_literal():
    # group [0.2, 0.9, 0.5]: best is 0.9, gap 0.9 − 0.5 = 0.4;
    #   unbiased var = (Σx² − 3μ²)/2 = (1.1 − 2.56/3)/2 = 0.37/3 -> A = 0.4/(sqrt(0.37/3) + 1e-6)
    # group [1, 1, 0]: tie for the best -> gap 0 -> all 0.
    scores = t32([0.2, 0.9, 0.5, 1.0, 1.0, 0.0])
    mask = torch.ones(6, 2, dtype=torch.bool)
    a = 0.4 / (math.sqrt(0.37 / 3) + 1e-6)
    out = grpo_passk_advantages(scores, mask, group_size=3, norm_by_std=True)
    assert_close(out, torch.where(mask, t32([0, a, 0, 0, 0, 0])[:, None], 0.0), **EXACT)
    raw = grpo_passk_advantages(scores, mask, group_size=3, norm_by_std=False)
    assert_close(raw, torch.where(mask, t32([0, 0.4, 0, 0, 0, 0])[:, None], 0.0), **EXACT)


def test_grpo_passk_all_equal_with_eps_zero_is_zero():
    # gap 0 and std 0: no 0/0, the group is 0.
    out = grpo_passk_advantages(
        t32([0.3, 0.3]), torch.ones(2, 1, dtype=torch.bool), group_size=2, norm_by_std=True, eps=0.0
    )
    assert torch.equal(out, torch.zeros(2, 1))


# ----------------------------------------------------------------------------------------------------
# Identities between functions


@st.composite
def token_batch(draw, dtype=torch.float32):
    """rewards, values [B, T] and a mask with arbitrary holes (all-False rows included)."""
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p_valid = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    rewards = torch.randn(b, t, generator=g, dtype=dtype)
    values = torch.randn(b, t, generator=g, dtype=dtype)
    mask = torch.rand(b, t, generator=g) < p_valid
    return rewards, values, mask


@given(token_batch(dtype=torch.float64), st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_gae_lam1_is_discounted_return_minus_value(batch, gamma):
    rewards, values, mask = batch
    gae = gae_advantages_unwhitened(rewards, values, mask, gamma=gamma, lam=1.0)
    discounted = reinforce_pp_advantages(rewards, mask, gamma=gamma).returns
    assert_close(gae.advantages, torch.where(mask, discounted - values, 0.0), **EXACT)
    assert_close(gae.returns, discounted, **EXACT)


@given(token_batch(), st.sampled_from([0.5, 1.0]), st.sampled_from([0.0, 0.95]))
def test_gae_whitened_is_whitened_unwhitened(batch, gamma, lam):
    rewards, values, mask = batch
    raw = gae_advantages_unwhitened(rewards, values, mask, gamma=gamma, lam=lam)
    out = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    assert torch.equal(out.advantages, masked_whiten(raw.advantages, mask))
    assert torch.equal(out.returns, raw.returns)


@given(token_batch(dtype=torch.float64))
def test_remax_returns_are_undiscounted_returns(batch):
    rewards, values, mask = batch
    baseline = values[:, 0]
    out = remax_advantages(rewards, mask, baseline)
    g = reinforce_pp_advantages(rewards, mask, gamma=1.0).returns
    assert_close(out.returns, g, **EXACT)
    assert_close(out.advantages, torch.where(mask, g - baseline[:, None], 0.0), **EXACT)


@st.composite
def outcome_batch(draw, min_group=1, dtype=torch.float32):
    """scores [B] (binary, discrete with non-representable values, or continuous), a [B, T] mask."""
    n = draw(st.integers(min_group, 4))
    groups = draw(st.integers(1, 4))
    t = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["binary", "discrete", "continuous"]))
    holes = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b = n * groups
    if kind == "binary":
        scores = torch.randint(0, 2, (b,), generator=g).to(dtype)
    elif kind == "discrete":
        scores = torch.tensor([0.1, 0.3, -1.7, 2.0], dtype=dtype)[torch.randint(0, 4, (b,), generator=g)]
    else:
        scores = (3 * torch.randn(b, generator=g)).to(dtype)
    if holes:
        mask = torch.rand(b, t, generator=g) < 0.6
    else:
        mask = torch.arange(t)[None, :] < torch.randint(0, t + 1, (b,), generator=g)[:, None]
    return scores, mask, n


@given(outcome_batch(min_group=2))
def test_rloo_is_scaled_drgrpo(batch):
    scores, mask, n = batch
    expected = drgrpo_advantages(scores, mask, group_size=n) * (n / (n - 1))
    assert_close(rloo_advantages(scores, mask, group_size=n), expected, **EXACT)


@given(outcome_batch())
def test_gpg_is_alpha_times_drgrpo(batch):
    scores, mask, n = batch
    alpha = scores.numel() / max(int((scores != 0).sum()), 1)
    assert_close(
        gpg_advantages(scores, mask, group_size=n),
        alpha * drgrpo_advantages(scores, mask, group_size=n),
        **EXACT,
    )


@given(outcome_batch(min_group=2))
def test_grpo_is_drgrpo_over_std(batch):
    scores, mask, n = batch
    std = scores.reshape(-1, n).std(dim=-1).repeat_interleave(n)
    expected = drgrpo_advantages(scores, mask, group_size=n) / (std + 1e-6)[:, None]
    assert_close(grpo_advantages(scores, mask, group_size=n), expected, **EXACT)


@given(outcome_batch())
def test_reinforce_pp_baseline_is_whitened_drgrpo(batch):
    scores, mask, n = batch
    expected = masked_whiten(drgrpo_advantages(scores, mask, group_size=n), mask)
    assert torch.equal(reinforce_pp_baseline_advantages(scores, mask, group_size=n), expected)


@given(outcome_batch())
def test_opo_with_equal_lengths_is_drgrpo(batch):
    scores, mask, n = batch
    full = torch.ones_like(mask)
    assert_close(
        opo_advantages(scores, full, group_size=n), drgrpo_advantages(scores, full, group_size=n), **EXACT
    )


# ----------------------------------------------------------------------------------------------------
# Properties


OUTCOME_FNS = {
    "grpo": lambda s, m, n: grpo_advantages(s, m, group_size=n),
    "drgrpo": lambda s, m, n: drgrpo_advantages(s, m, group_size=n),
    "rloo": lambda s, m, n: rloo_advantages(s, m, group_size=n),
    "opo": lambda s, m, n: opo_advantages(s, m, group_size=n),
    "gpg": lambda s, m, n: gpg_advantages(s, m, group_size=n),
    "reinforce_pp_baseline": lambda s, m, n: reinforce_pp_baseline_advantages(s, m, group_size=n),
    "passk_std": lambda s, m, n: grpo_passk_advantages(s, m, group_size=n, norm_by_std=True),
    "passk_raw": lambda s, m, n: grpo_passk_advantages(s, m, group_size=n, norm_by_std=False),
}
MIN_GROUP = {"passk_std": 2, "passk_raw": 2}
# Whitening over the batch moves a zero-variance group away from 0 (verl's numbers).
ZERO_FOR_CONSTANT_GROUPS = [k for k in OUTCOME_FNS if k != "reinforce_pp_baseline"]

TOKEN_FNS = {
    "gae": lambda r, v, m: gae_advantages(r, v, m, gamma=0.9, lam=0.95),
    "gae_unwhitened": lambda r, v, m: gae_advantages_unwhitened(r, v, m, gamma=0.9, lam=0.95),
    "reinforce_pp": lambda r, v, m: reinforce_pp_advantages(r, m, gamma=0.9),
    "remax": lambda r, v, m: remax_advantages(r, m, torch.linspace(-1.0, 1.0, r.shape[0])),
}


@pytest.mark.parametrize("name", list(TOKEN_FNS))
@given(batch=token_batch(), garbage=st.sampled_from([NAN, INF, -INF, 1e30]))
def test_masked_token_values_never_change_outputs(name, batch, garbage):
    rewards, values, mask = batch
    fn = TOKEN_FNS[name]
    clean = fn(rewards, values, mask)
    dirty = fn(torch.where(mask, rewards, garbage), torch.where(mask, values, garbage), mask)
    for c, d in zip(clean, dirty):
        assert torch.equal(c, d)
        assert torch.isfinite(d).all()
        assert torch.equal(d[~mask], torch.zeros_like(d[~mask]))


@pytest.mark.parametrize("name", ["gae_unwhitened", "reinforce_pp", "remax"])
@given(batch=token_batch())
def test_holes_in_mask_are_transparent(name, batch):
    # Moving each row's valid tokens to the front (a right-padded row) gives the same values.
    rewards, values, mask = batch
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    gather = lambda x: torch.gather(x, 1, order)
    out = TOKEN_FNS[name](rewards, values, mask)
    packed = TOKEN_FNS[name](gather(rewards), gather(values), gather(mask))
    for o, p in zip(out, packed):
        assert_close(gather(o), p, **REORDER)


@pytest.mark.parametrize("name", list(OUTCOME_FNS))
@given(data=st.data())
def test_permuting_rows_in_a_group_permutes_advantages(name, data):
    scores, mask, n = data.draw(outcome_batch(min_group=MIN_GROUP.get(name, 1), dtype=torch.float64))
    groups = scores.numel() // n
    perm = torch.cat([k * n + torch.tensor(data.draw(st.permutations(range(n)))) for k in range(groups)])
    fn = OUTCOME_FNS[name]
    assert_close(fn(scores[perm], mask[perm], n), fn(scores, mask, n)[perm], **REORDER)


@pytest.mark.parametrize("name", ZERO_FOR_CONSTANT_GROUPS)
@given(batch=outcome_batch(min_group=2), data=st.data())
def test_zero_variance_groups_give_exactly_zero(name, batch, data):
    scores, mask, n = batch
    grouped = scores.reshape(-1, n).clone()
    constant = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(grouped), max_size=len(grouped))))
    grouped[constant] = grouped[constant][:, :1].expand(-1, n)
    out = OUTCOME_FNS[name](grouped.reshape(-1), mask, n)
    rows = constant.repeat_interleave(n)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))  # exactly 0, no rounding noise


@pytest.mark.parametrize("name", list(OUTCOME_FNS))
@given(data=st.data(), empty_rows=st.sampled_from(["alternate", "all"]))
def test_outcome_outputs_finite_with_empty_responses(name, data, empty_rows):
    scores, mask, n = data.draw(outcome_batch(min_group=MIN_GROUP.get(name, 1)))
    mask = (
        torch.zeros_like(mask)
        if empty_rows == "all"
        else mask.index_fill(0, torch.arange(0, len(mask), 2), False)
    )
    out = OUTCOME_FNS[name](scores, mask, n)
    assert out.shape == mask.shape
    assert torch.isfinite(out).all()
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


@pytest.mark.parametrize("name", list(TOKEN_FNS))
def test_token_outputs_finite_for_all_masked_batch(name):
    out = TOKEN_FNS[name](torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    for o in out:
        assert torch.equal(o, torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------------------
# Bad input


def _ok_tokens():
    return torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda r, v, m: gae_advantages(r, v[:, :2], m, gamma=1.0, lam=1.0), "values"),
        (lambda r, v, m: gae_advantages(r, v, m[:, :2], gamma=1.0, lam=1.0), "response_mask"),
        (lambda r, v, m: gae_advantages(r, v, m.float(), gamma=1.0, lam=1.0), "response_mask"),
        (lambda r, v, m: gae_advantages(r[0], v[0], m[0], gamma=1.0, lam=1.0), "token_rewards"),
        (lambda r, v, m: gae_advantages(r.long(), v, m, gamma=1.0, lam=1.0), "token_rewards"),
        (lambda r, v, m: gae_advantages(r, v, m, gamma=1.5, lam=1.0), "gamma"),
        (lambda r, v, m: gae_advantages(r, v, m, gamma=1.0, lam=-0.1), "lam"),
        (
            lambda r, v, m: gae_advantages_unwhitened(
                r.index_fill(1, torch.tensor([1]), NAN), v, m, gamma=1.0, lam=1.0
            ),
            "token_rewards",
        ),
        (
            lambda r, v, m: gae_advantages_unwhitened(
                r, v.index_fill(1, torch.tensor([1]), INF), m, gamma=1.0, lam=1.0
            ),
            "values",
        ),
        (
            lambda r, v, m: reinforce_pp_advantages(r.index_fill(1, torch.tensor([0]), -INF), m, gamma=1.0),
            "token_rewards",
        ),
        (lambda r, v, m: reinforce_pp_advantages(r, m.int(), gamma=1.0), "response_mask"),
        (lambda r, v, m: remax_advantages(r, m, torch.zeros(3)), "baseline_scores"),
        (lambda r, v, m: remax_advantages(r, m, t32([0.0, NAN])), "baseline_scores"),
        (lambda r, v, m: remax_advantages(r, m, torch.zeros(2, 1)), "baseline_scores"),
    ],
)
def test_bad_token_inputs(call, arg):
    with pytest.raises(ValueError, match=arg):
        call(*_ok_tokens())


@pytest.mark.parametrize("name", list(OUTCOME_FNS))
@pytest.mark.parametrize(
    "scores, mask, n, arg",
    [
        (torch.zeros(4), torch.ones(5, 2, dtype=torch.bool), 2, "response_mask"),  # B mismatch
        (torch.zeros(4), torch.ones(4, 2), 2, "response_mask"),  # not bool
        (torch.zeros(4), torch.ones(4, dtype=torch.bool), 2, "response_mask"),  # not [B, T]
        (torch.zeros(4), torch.ones(4, 2, dtype=torch.bool), 3, "group_size"),  # does not divide
        (torch.zeros(4), torch.ones(4, 2, dtype=torch.bool), 0, "group_size"),
        (torch.zeros(4, 1), torch.ones(4, 2, dtype=torch.bool), 2, "scores"),  # not [B]
        (torch.zeros(4, dtype=torch.long), torch.ones(4, 2, dtype=torch.bool), 2, "scores"),
        (t32([0.0, NAN, 1.0, 1.0]), torch.ones(4, 2, dtype=torch.bool), 2, "scores"),
        (t32([0.0, INF, 1.0, 1.0]), torch.ones(4, 2, dtype=torch.bool), 2, "scores"),
    ],
)
def test_bad_outcome_inputs(name, scores, mask, n, arg):
    with pytest.raises(ValueError, match=arg):
        OUTCOME_FNS[name](scores, mask, n)


def test_bad_passk_and_eps_inputs():
    m = torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="group_size"):  # pass@k needs two responses per group
        grpo_passk_advantages(torch.zeros(4), m, group_size=1, norm_by_std=True)
    with pytest.raises(ValueError, match="norm_by_std"):
        grpo_passk_advantages(torch.zeros(4), m, group_size=2, norm_by_std=1)
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(torch.zeros(4), m, group_size=2, eps=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(4), m, group_size=2.0)

"""Tests for rlprims/ops/kl.py: literal examples, identities, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from rlprims.ops.kl import (
    AdaptiveKLState,
    FixedKLState,
    adaptive_kl_init,
    adaptive_kl_update,
    fixed_kl_init,
    fixed_kl_update,
    kl_abs,
    kl_abs_st,
    kl_in_reward,
    kl_k1,
    kl_k1_st,
    kl_k2,
    kl_k3,
    kl_k3_st,
)
from rlprims.ops.reduce import aggregate_token_mean
from tests.tolerances import EXACT

NAN, INF = float("nan"), float("inf")
T_, F_ = True, False
ESTIMATORS = [kl_k1, kl_k2, kl_k3, kl_abs, kl_k1_st, kl_k3_st, kl_abs_st]
ST_PAIRS = [(kl_k1_st, kl_k1), (kl_k3_st, kl_k3), (kl_abs_st, kl_abs)]


def t32(x):
    return torch.tensor(x, dtype=torch.float32)


def bmask(x):
    return torch.tensor(x, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------
# Literal examples
# logprobs = [−1, −2, −0.5], ref = [−1.5, −1, −0.5]  ->  Δ = [0.5, −1, 0]

LP = t32([[-1.0, -2.0, -0.5]])
REF = t32([[-1.5, -1.0, -0.5]])


def test_k1_k2_abs_literal():
    assert_close(kl_k1(LP, REF), t32([[0.5, -1.0, 0.0]]), **EXACT)
    # ½Δ² = [0.125, 0.5, 0]
    assert_close(kl_k2(LP, REF), t32([[0.125, 0.5, 0.0]]), **EXACT)
    assert_close(kl_abs(LP, REF), t32([[0.5, 1.0, 0.0]]), **EXACT)


def test_k3_literal():
    # x = −Δ = [−0.5, 1, 0];  eˣ − x − 1 = [e^−0.5 − 0.5 = 0.10653066, e − 2 = 0.71828183, 0]
    assert_close(kl_k3(LP, REF), t32([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]]), **EXACT)


def test_k3_clamps_as_verl():
    # Δ = −5:  x = 5,   e⁵ − 6 = 142.4 -> value clamp 10
    # Δ = 30:  x = −30 -> clamp −20:  e^−20 + 19 = 19.000000002 -> 10
    # Δ = 10:  x = −10: e^−10 + 9 = 9.0000454 (not clamped)
    # Δ = 1e4: x = −20 -> 10
    lp = t32([[-5.0, 30.0, 10.0, 1e4]])
    out = kl_k3(lp, torch.zeros_like(lp))
    assert_close(out, t32([[10.0, 10.0, math.exp(-10) + 9.0, 10.0]]), **EXACT)


def test_straight_through_literal_value_and_grad():
    # Value of the named estimator, gradient of k2: ∂/∂logprobs = Δ = [0.5, −1, 0], ∂/∂ref = −Δ.
    for st_fn, base in ST_PAIRS:
        lp = LP.clone().requires_grad_(True)
        ref = REF.clone().requires_grad_(True)
        out = st_fn(lp, ref)
        assert torch.equal(out, base(LP, REF))
        out.sum().backward()
        assert_close(lp.grad, t32([[0.5, -1.0, 0.0]]), **EXACT)
        assert_close(ref.grad, t32([[-0.5, 1.0, 0.0]]), **EXACT)


def test_kl_in_reward_literal():
    # β = 0.5. Row 0 all valid, row 1 last token padding (NaN reward, inf kl), row 2 empty.
    #   rewards row 0: [0 − 0.05, 0 − 0.1, 1 − 0.15] = [−0.05, −0.1, 0.85]
    #   rewards row 1: [0 − 0.2, 2 − 0.25, (pad) 0] = [−0.2, 1.75, 0]
    #   per-seq kl: row 0 (0.1+0.2+0.3)/3 = 0.2, row 1 (0.4+0.5)/2 = 0.45, row 2 skipped
    #   actor/reward_kl_penalty = (0.2 + 0.45)/2 = 0.325
    r = t32([[0.0, 0.0, 1.0], [0.0, 2.0, NAN], [NAN, INF, 3.0]])
    kl = t32([[0.1, 0.2, 0.3], [0.4, 0.5, INF], [NAN, 1.0, -INF]])
    mask = bmask([[T_, T_, T_], [T_, T_, F_], [F_, F_, F_]])
    out = kl_in_reward(r, kl, mask, kl_coef=0.5)
    assert_close(out.rewards, t32([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [0.0, 0.0, 0.0]]), **EXACT)
    assert_close(out.metrics["actor/reward_kl_penalty"], t32(0.325), **EXACT)
    assert_close(out.metrics["actor/reward_kl_penalty_coeff"], t32(0.5), **EXACT)
    assert set(out.metrics) == {"actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff"}


def test_kl_in_reward_all_masked_is_zero():
    r = t32([[NAN, 1.0], [2.0, INF]])
    out = kl_in_reward(r, t32([[1.0, NAN], [INF, 2.0]]), bmask([[F_, F_], [F_, F_]]), kl_coef=0.1)
    assert torch.equal(out.rewards, torch.zeros(2, 2))
    assert float(out.metrics["actor/reward_kl_penalty"]) == 0.0


def test_fixed_controller_literal():
    s = fixed_kl_init(kl_coef=0.001)
    assert s == FixedKLState(kl_coef=0.001)
    assert fixed_kl_update(s, current_kl=5.0, n_steps=256) == s


def test_adaptive_controller_literal():
    # verl defaults β = 0.001, target 0.1, horizon 10000, n = 256:
    #   KL = 0.15: e = clip(0.5, ±0.2) = 0.2    -> β = 0.001·(1 + 0.2·256/1e4)  = 0.00100512
    #   KL = 0.09: e = −0.1                     -> β = 0.001·(1 − 0.1·256/1e4)  = 0.00099744
    #   KL = 0.1:  e = 0                        -> β unchanged
    #   KL = 0:    e = clip(−1, ±0.2) = −0.2    -> β = 0.001·(1 − 0.2·256/1e4)  = 0.00099488
    s = adaptive_kl_init(init_kl_coef=0.001, target_kl=0.1, horizon=10000)
    assert s == AdaptiveKLState(kl_coef=0.001, target_kl=0.1, horizon=10000.0)
    assert adaptive_kl_update(s, current_kl=0.15, n_steps=256).kl_coef == pytest.approx(0.00100512, rel=1e-12)
    assert adaptive_kl_update(s, current_kl=0.09, n_steps=256).kl_coef == pytest.approx(0.00099744, rel=1e-12)
    assert adaptive_kl_update(s, current_kl=0.1, n_steps=256).kl_coef == pytest.approx(0.001, rel=1e-12)
    assert adaptive_kl_update(s, current_kl=0.0, n_steps=256).kl_coef == pytest.approx(0.00099488, rel=1e-12)
    # A 0-dim tensor (the metric of kl_in_reward) is accepted.
    s2 = adaptive_kl_update(s, current_kl=torch.tensor(0.15), n_steps=256)
    assert s2.kl_coef == pytest.approx(0.00100512, rel=1e-6)
    assert (s2.target_kl, s2.horizon) == (0.1, 10000.0)


def test_controller_loop_with_kl_in_reward():
    # The metric of kl_in_reward drives the controller; the state's β feeds the next call.
    state = adaptive_kl_init(init_kl_coef=0.2, target_kl=0.1, horizon=4)
    kl = torch.full((2, 3), 1.0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = kl_in_reward(torch.zeros(2, 3), kl, mask, kl_coef=state.kl_coef)
    # KL 1.0 ≫ target: e = 0.2, β = 0.2·(1 + 0.2·2/4) = 0.22
    state = adaptive_kl_update(state, current_kl=out.metrics["actor/reward_kl_penalty"], n_steps=2)
    assert state.kl_coef == pytest.approx(0.22, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Identities


def test_k1_and_k3_are_unbiased_on_samples():
    # Tokens sampled from p; mean of k1 and k3 ≈ KL(p ‖ q) (|Δ| < 2 here, so the k3 clamps never bind).
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = float((p * (p.log() - q.log())).sum())  # ≈ 0.1064
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, ref = p.log()[x].view(1, -1), q.log()[x].view(1, -1)
    # Standard errors are ≈ 0.0013 (k1) and ≈ 0.0004 (k3); 0.006 is > 4 standard errors.
    assert abs(float(kl_k1(lp, ref).mean()) - exact) < 0.006
    assert abs(float(kl_k3(lp, ref).mean()) - exact) < 0.006
    assert bool((kl_k3(lp, ref) >= 0).all())


def test_k2_gradient_is_kl_gradient_and_k1_is_not():
    # π = softmax(θ). Samples held fixed, E[∇θ k2] = ∇θ KL(π ‖ q), while E[∇θ k1] = E[∇ log π] = 0.
    g = torch.Generator().manual_seed(1)
    theta = torch.tensor([0.5, -0.2, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logp = torch.log_softmax(theta, dim=0)
    x = torch.multinomial(logp.exp().detach(), 200_000, replacement=True, generator=g)
    (exact_grad,) = torch.autograd.grad((logp.exp() * (logp - q.log())).sum(), theta, retain_graph=True)
    lp, ref = logp[x].view(1, -1), q.log()[x].view(1, -1)
    (g_k2,) = torch.autograd.grad(kl_k2(lp, ref).mean(), theta, retain_graph=True)
    (g_k3st,) = torch.autograd.grad(kl_k3_st(lp, ref).mean(), theta, retain_graph=True)
    (g_k1,) = torch.autograd.grad(kl_k1(lp, ref).mean(), theta)
    assert (g_k2 - exact_grad).abs().max() < 0.01  # |∇KL| ≈ 0.3 here; sampling error ≈ 0.002
    assert torch.equal(g_k3st, g_k2)
    assert g_k1.abs().max() < 0.01  # mean of ∇ log π = (empirical frequencies − π): sampling noise only
    assert exact_grad.abs().max() > 0.1


def test_abs_is_abs_k1_and_k2_is_half_k1_squared():
    g = torch.Generator().manual_seed(2)
    lp, ref = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert torch.equal(kl_abs(lp, ref), kl_k1(lp, ref).abs())
    assert torch.equal(kl_k2(lp, ref), 0.5 * kl_k1(lp, ref).square())


@pytest.mark.parametrize("st_fn,base", ST_PAIRS)
def test_straight_through_value_and_grad_exact(st_fn, base):
    g = torch.Generator().manual_seed(3)
    lp0, ref0 = 3 * torch.randn(4, 7, generator=g), 3 * torch.randn(4, 7, generator=g)
    lp, ref = lp0.clone().requires_grad_(True), ref0.clone().requires_grad_(True)
    lp2, ref2 = lp0.clone().requires_grad_(True), ref0.clone().requires_grad_(True)
    weights = torch.rand(4, 7, generator=g)
    out = st_fn(lp, ref)
    assert torch.equal(out, base(lp0, ref0))
    (out * weights).sum().backward()
    (kl_k2(lp2, ref2) * weights).sum().backward()
    assert torch.equal(lp.grad, lp2.grad)
    assert torch.equal(ref.grad, ref2.grad)


# ----------------------------------------------------------------------------------------------------
# Properties


def _pair_and_mask(data, *, low=-30.0, high=5.0):
    b = data.draw(st.integers(1, 4))
    t = data.draw(st.integers(1, 6))
    vals = st.floats(low, high, allow_nan=False, width=32)
    lp = torch.tensor(data.draw(st.lists(st.lists(vals, min_size=t, max_size=t), min_size=b, max_size=b)))
    ref = torch.tensor(data.draw(st.lists(st.lists(vals, min_size=t, max_size=t), min_size=b, max_size=b)))
    mask = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b))
    )
    return lp, ref, mask


def _garbage(shape):
    """NaN, inf and −inf in a fixed pattern, to put under a False mask."""
    pattern = torch.arange(math.prod(shape)).view(shape) % 3
    return torch.where(pattern == 0, NAN, torch.where(pattern == 1, INF, -INF))


@given(st.data())
def test_k3_nonnegative(data):
    lp, ref, _ = _pair_and_mask(data)
    # ≥ 0 mathematically; fp32 rounding of eˣ − x − 1 near x = 0 can give −1 ulp of 1.
    assert bool((kl_k3(lp, ref) >= -1e-6).all())
    assert bool((kl_k3_st(lp, ref) >= -1e-6).all())


@given(st.data(), st.sampled_from(ESTIMATORS))
def test_masked_values_do_not_change_aggregated_kl(data, fn):
    lp, ref, mask = _pair_and_mask(data)
    garbage = _garbage(lp.shape)
    lp_bad = torch.where(mask, lp, garbage)
    ref_bad = torch.where(mask, ref, -garbage)
    n = max(int(mask.sum()), 1)
    clean = aggregate_token_mean(fn(lp, ref), mask, num_tokens=n)
    dirty = aggregate_token_mean(fn(lp_bad, ref_bad), mask, num_tokens=n)
    assert torch.equal(clean, dirty)
    # Element-wise: valid positions are bit-identical.
    assert torch.equal(fn(lp, ref)[mask], fn(lp_bad, ref_bad)[mask])


@given(st.data(), st.sampled_from(ESTIMATORS))
def test_extreme_inputs_finite_value_and_grad(data, fn):
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    signs = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=b * t, max_size=b * t)))
    ref = torch.zeros(b, t, requires_grad=True)
    lp = (1e4 * signs.view(b, t)).requires_grad_(True)  # Δ = ±1e4
    out = fn(lp, ref)
    assert bool(torch.isfinite(out).all())
    out.sum().backward()
    assert bool(torch.isfinite(lp.grad).all()) and bool(torch.isfinite(ref.grad).all())


@given(st.data())
def test_kl_in_reward_masked_values_do_not_matter(data):
    lp, ref, mask = _pair_and_mask(data)
    r = torch.randn(lp.shape, generator=torch.Generator().manual_seed(4))
    kl = kl_k1(lp, ref)
    garbage = _garbage(lp.shape)
    beta = data.draw(st.floats(0.0, 2.0))
    a = kl_in_reward(r, kl, mask, kl_coef=beta)
    b = kl_in_reward(torch.where(mask, r, garbage), torch.where(mask, kl, garbage), mask, kl_coef=beta)
    assert torch.equal(a.rewards, b.rewards)
    assert torch.equal(a.rewards[~mask], torch.zeros(int((~mask).sum())))
    for k in a.metrics:
        assert torch.equal(a.metrics[k], b.metrics[k])
        assert bool(torch.isfinite(a.metrics[k]))


@given(st.floats(0.0, 10.0), st.floats(1e-3, 1.0), st.integers(0, 10_000))
def test_adaptive_update_moves_at_most_20_percent_per_horizon(kl, target, n):
    s = adaptive_kl_init(init_kl_coef=0.1, target_kl=target, horizon=10_000)
    new = adaptive_kl_update(s, current_kl=kl, n_steps=n).kl_coef
    # |e| ≤ 0.2 and n ≤ horizon -> β' / β ∈ [0.8, 1.2]; sign follows KL − target.
    assert 0.1 * 0.8 - 1e-12 <= new <= 0.1 * 1.2 + 1e-12
    if kl > target:
        assert new >= 0.1
    if kl < target:
        assert new <= 0.1


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("fn", ESTIMATORS)
def test_estimators_reject_bad_input(fn):
    with pytest.raises(ValueError, match="ref_logprobs"):
        fn(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logprobs"):
        fn(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logprobs"):
        fn([[0.0]], torch.zeros(1, 1))


def test_kl_in_reward_rejects_bad_input():
    r, kl, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="response_mask"):
        kl_in_reward(r, kl, m.float(), kl_coef=0.1)
    with pytest.raises(ValueError, match="response_mask"):
        kl_in_reward(r, kl, m[:, :2], kl_coef=0.1)
    with pytest.raises(ValueError, match="kl"):
        kl_in_reward(r, torch.zeros(2, 4), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_in_reward(r, kl, m, kl_coef=-0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_in_reward(r, kl, m, kl_coef=INF)
    with pytest.raises(ValueError, match="token_rewards"):
        kl_in_reward(torch.zeros(6), torch.zeros(6), torch.ones(6, dtype=torch.bool), kl_coef=0.1)
    with pytest.raises(ValueError, match="token_rewards"):
        kl_in_reward(t32([[NAN, 0.0, 0.0], [0.0, 0.0, 0.0]]), kl, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl"):
        kl_in_reward(r, t32([[INF, 0.0, 0.0], [0.0, 0.0, 0.0]]), m, kl_coef=0.1)


def test_controllers_reject_bad_input():
    with pytest.raises(ValueError, match="kl_coef"):
        fixed_kl_init(kl_coef=-1.0)
    with pytest.raises(ValueError, match="init_kl_coef"):
        adaptive_kl_init(init_kl_coef=NAN, target_kl=0.1, horizon=10)
    with pytest.raises(ValueError, match="target_kl"):
        adaptive_kl_init(init_kl_coef=0.1, target_kl=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        adaptive_kl_init(init_kl_coef=0.1, target_kl=0.1, horizon=0)
    s = adaptive_kl_init(init_kl_coef=0.1, target_kl=0.1, horizon=10)
    with pytest.raises(ValueError, match="current_kl"):
        adaptive_kl_update(s, current_kl=NAN, n_steps=1)
    with pytest.raises(ValueError, match="current_kl"):
        adaptive_kl_update(s, current_kl=torch.zeros(2), n_steps=1)
    with pytest.raises(ValueError, match="n_steps"):
        adaptive_kl_update(s, current_kl=0.1, n_steps=-1)
    with pytest.raises(ValueError, match="n_steps"):
        adaptive_kl_update(s, current_kl=0.1, n_steps=2.0)
    with pytest.raises(ValueError, match="state"):
        adaptive_kl_update(fixed_kl_init(kl_coef=0.1), current_kl=0.1, n_steps=1)
    with pytest.raises(ValueError, match="state"):
        fixed_kl_update(s, current_kl=0.1, n_steps=1)

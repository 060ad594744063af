"""Tests for rlprims/ops/preference.py: literal examples, identities, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from rlprims.ops.preference import dpo_loss, ipo_loss, sequence_logprobs, sppo_loss, sppo_rewards
from tests.tolerances import EXACT

NAN, INF = float("nan"), float("inf")
T_, F_ = True, False
PAIR_LOSSES = [dpo_loss, ipo_loss]
PAIR_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def t32(x):
    return torch.tensor(x, dtype=torch.float32)


def softplus(x):
    return math.log1p(math.exp(x))


# Two pairs, β = 0.5:
#   chosen log-ratio   = [−1 − (−1.5), −2 − (−2)] = [0.5, 0]
#   rejected log-ratio = [−3 − (−2.5), −1 − (−1.5)] = [−0.5, 0.5]
#   h = [1, −0.5];  implicit rewards chosen = β·[0.5, 0] = [0.25, 0], rejected = [−0.25, 0.25]
PC, PR = t32([-1.0, -2.0]), t32([-3.0, -1.0])
RC, RR = t32([-1.5, -2.0]), t32([-2.5, -1.5])


def test_dpo_literal():
    # L = −log σ(β h) = softplus(−β h): [softplus(−0.5) = 0.474077, softplus(0.25) = 0.825939]
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert_close(out.loss, t32([softplus(-0.5), softplus(0.25)]), **EXACT)
    # chosen mean (0.25 + 0)/2; rejected mean (−0.25 + 0.25)/2 = 0; accuracy [T, F] -> 0.5;
    # margins [0.5, −0.25] -> 0.125
    assert set(out.metrics) == PAIR_METRICS
    assert_close(out.metrics["rewards/chosen"], t32(0.125), **EXACT)
    assert_close(out.metrics["rewards/rejected"], t32(0.0), **EXACT)
    assert_close(out.metrics["rewards/accuracies"], t32(0.5), **EXACT)
    assert_close(out.metrics["rewards/margins"], t32(0.125), **EXACT)


def test_dpo_label_smoothing_literal():
    # ε = 0.1: L = 0.9·softplus(−β h) + 0.1·softplus(β h)
    #   pair 0: 0.9·0.474077 + 0.1·softplus(0.5) (= 0.974077) = 0.524077
    #   pair 1: 0.9·0.825939 + 0.1·softplus(−0.25) (= 0.575939) = 0.800939
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    expected = [0.9 * softplus(-0.5) + 0.1 * softplus(0.5), 0.9 * softplus(0.25) + 0.1 * softplus(-0.25)]
    assert_close(out.loss, t32(expected), **EXACT)


def test_dpo_gradient_literal():
    # ∂L/∂log π(y_w) = −β σ(−β h), ∂L/∂log π(y_l) = +β σ(−β h); pair 0: σ(−0.5) = 0.377541 -> ∓0.188771
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    dpo_loss(pc, pr, RC, RR, beta=0.5).loss.sum().backward()
    s = [1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.25))]
    assert_close(pc.grad, t32([-0.5 * s[0], -0.5 * s[1]]), **EXACT)
    assert_close(pr.grad, t32([0.5 * s[0], 0.5 * s[1]]), **EXACT)


def test_ipo_literal():
    # 1/(2β) = 1: L = (h − 1)² = [0, 2.25]; same implicit-reward metrics as DPO.
    out = ipo_loss(PC, PR, RC, RR, beta=0.5)
    assert_close(out.loss, t32([0.0, 2.25]), **EXACT)
    assert_close(out.metrics["rewards/margins"], t32(0.125), **EXACT)
    assert set(out.metrics) == PAIR_METRICS


def test_sppo_literal():
    # η = 2: log-ratio = [−1 − (−1.2), −2 − (−1.5)] = [0.2, −0.5]; target η p = [0.5, −1]
    #   L = [(0.2 − 0.5)², (−0.5 + 1)²] = [0.09, 0.25]
    out = sppo_loss(t32([-1.0, -2.0]), t32([-1.2, -1.5]), t32([0.25, -0.5]), eta=2.0)
    assert_close(out.loss, t32([0.09, 0.25]), **EXACT)
    assert_close(out.metrics["actor/log_ratio_mean"], t32(-0.15), **EXACT)
    assert_close(out.metrics["actor/preference_mean"], t32(-0.25), **EXACT)


def test_sppo_rewards_literal():
    # β = 0: mean-centered per group of 2: [1, 0 | 0, 1] -> [0.5, −0.5, −0.5, 0.5]
    s = t32([1.0, 0.0, 0.0, 1.0])
    assert_close(sppo_rewards(s, beta=0.0, group_size=2), t32([0.5, -0.5, -0.5, 0.5]), **EXACT)
    # β = 1: SoftMean([1, 0]) = log((e + 1)/2) = 0.620115 -> [0.379885, −0.620115]
    sm = math.log((math.e + 1) / 2)
    assert_close(sppo_rewards(s[:2], beta=1.0, group_size=2), t32([1 - sm, -sm]), **EXACT)
    # verl: the whole batch is one group. SoftMean_1([1, 0, 0, 1]) is the same 0.620115.
    assert_close(sppo_rewards(s, beta=1.0, group_size=4), t32([1 - sm, -sm, -sm, 1 - sm]), **EXACT)
    # A group of one gives 0.
    assert torch.equal(sppo_rewards(t32([3.0, -2.0]), beta=0.7, group_size=1), torch.zeros(2))


def test_sequence_logprobs_literal():
    # Row 0: −1 − 2 = −3 (third token padding, NaN); row 1: empty -> 0.
    lp = t32([[-1.0, -2.0, NAN], [INF, -1.0, -2.0]])
    mask = torch.tensor([[T_, T_, F_], [F_, F_, F_]])
    assert_close(sequence_logprobs(lp, mask), t32([-3.0, 0.0]), **EXACT)


# ----------------------------------------------------------------------------------------------------
# Identities


def test_dpo_without_smoothing_is_neg_logsigmoid_of_scaled_margin():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-5 * torch.rand(8, generator=g) for _ in range(4))
    beta = 0.3
    margin = (pc - rc) - (pr - rr)
    assert torch.equal(dpo_loss(pc, pr, rc, rr, beta=beta).loss, -F.logsigmoid(beta * margin))


def test_dpo_is_symmetric_under_swap_with_complementary_smoothing():
    # Swapping chosen and rejected flips h; L_ε(−h) = ε softplus(−βh) + (1−ε) softplus(βh).
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-5 * torch.rand(8, generator=g) for _ in range(4))
    eps, beta = 0.2, 0.7
    swapped = dpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps).loss
    h = (pc - rc) - (pr - rr)
    assert_close(swapped, eps * F.softplus(-beta * h) + (1 - eps) * F.softplus(beta * h), **EXACT)


def test_spin_is_dpo_with_previous_iterate_as_reference():
    # SPIN (arXiv:2401.01335): ℓ(λ log π(y)/π_t(y) − λ log π(y')/π_t(y')), ℓ(t) = log(1 + e^−t).
    g = torch.Generator().manual_seed(2)
    p_real, p_gen, t_real, t_gen = (-5 * torch.rand(6, generator=g) for _ in range(4))
    lam = 0.1
    spin = torch.log1p(torch.exp(-(lam * (p_real - t_real) - lam * (p_gen - t_gen))))
    assert_close(dpo_loss(p_real, p_gen, t_real, t_gen, beta=lam).loss, spin, **EXACT)


def test_ipo_minimum_at_target_margin():
    # The IPO loss is 0 exactly when h = 1/(2β), and its gradient in h there is 0.
    beta = 0.25  # target 2
    pc = torch.tensor([2.0], requires_grad=True)
    out = ipo_loss(pc, t32([0.0]), t32([0.0]), t32([0.0]), beta=beta).loss
    out.sum().backward()
    assert float(out.detach()) == 0.0 and float(pc.grad) == 0.0


def test_sppo_rewards_between_mean_and_max():
    # SoftMean_β → mean as β → 0 and → max as β → ∞.
    g = torch.Generator().manual_seed(3)
    s = torch.randn(12, generator=g, dtype=torch.float64)
    groups = s.view(3, 4)
    near_mean = s - sppo_rewards(s, beta=1e-6, group_size=4)
    near_max = s - sppo_rewards(s, beta=1e4, group_size=4)
    assert_close(near_mean, groups.mean(-1, keepdim=True).expand(3, 4).reshape(-1), rtol=0, atol=1e-5)
    assert_close(near_max, groups.amax(-1, keepdim=True).expand(3, 4).reshape(-1), rtol=0, atol=1e-3)


def test_sppo_gradient_pushes_log_ratio_to_target():
    # ∂L/∂log π = 2 (log π − log π_t − η p): zero at the target, sign of the excess elsewhere.
    lp = t32([-1.0, -1.0, -1.0]).requires_grad_(True)
    sppo_loss(lp, t32([-1.0, -1.5, -0.5]), t32([0.25, 0.25, 0.25]), eta=2.0).loss.sum().backward()
    # log-ratios [0, 0.5, −0.5] vs target 0.5: grads 2·[−0.5, 0, −1]
    assert_close(lp.grad, t32([-1.0, 0.0, -2.0]), **EXACT)


# ----------------------------------------------------------------------------------------------------
# Properties


def _vec(data, n, low=-50.0, high=0.0):
    return torch.tensor(data.draw(st.lists(st.floats(low, high, width=32), min_size=n, max_size=n)))


@given(st.data(), st.sampled_from(PAIR_LOSSES))
def test_pair_losses_finite_nonnegative_for_extreme_inputs(data, fn):
    n = data.draw(st.integers(1, 6))
    four = [_vec(data, n, -1e4, 0.0) for _ in range(4)]
    beta = data.draw(st.floats(1e-3, 10.0))
    for t in four:
        t.requires_grad_(True)
    out = fn(*four, beta=beta)
    assert bool(torch.isfinite(out.loss).all()) and bool((out.loss >= 0).all())
    out.loss.sum().backward()
    for t in four:
        assert bool(torch.isfinite(t.grad).all())
    assert 0.0 <= float(out.metrics["rewards/accuracies"]) <= 1.0
    for v in out.metrics.values():
        assert bool(torch.isfinite(v)) and not v.requires_grad


@given(st.data())
def test_sequence_logprobs_masked_values_never_matter(data):
    b, t = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    lp = _vec(data, b * t).view(b, t)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    pattern = torch.arange(b * t).view(b, t) % 3
    garbage = torch.where(pattern == 0, NAN, torch.where(pattern == 1, INF, -INF))
    clean = sequence_logprobs(lp, mask)
    dirty = sequence_logprobs(torch.where(mask, lp, garbage), mask)
    assert torch.equal(clean, dirty)
    # ...and therefore neither does any preference loss built on them.
    half = b // 2
    if half:
        a = dpo_loss(clean[:half], clean[half : 2 * half], clean[:half], clean[half : 2 * half], beta=0.1)
        d = dpo_loss(dirty[:half], dirty[half : 2 * half], dirty[:half], dirty[half : 2 * half], beta=0.1)
        assert torch.equal(a.loss, d.loss)


@given(st.data())
def test_sppo_finite_and_zero_at_target(data):
    n = data.draw(st.integers(1, 6))
    old, pref = _vec(data, n, -1e4, 0.0), _vec(data, n, -1.0, 1.0)
    eta = data.draw(st.floats(1e-3, 10.0))
    out = sppo_loss(old + eta * pref, old, pref, eta=eta)
    assert bool(torch.isfinite(out.loss).all())
    # log π chosen exactly on the target: loss is the squared fp32 rounding of (old + η p) − old − η p.
    assert bool((out.loss <= (1e-3 * (1 + old.abs())) ** 2).all())


def test_empty_batch():
    e = torch.zeros(0)
    for fn in PAIR_LOSSES:
        out = fn(e, e, e, e, beta=0.1)
        assert out.loss.shape == (0,)
        assert all(float(v) == 0.0 for v in out.metrics.values())
    out = sppo_loss(e, e, e, eta=1.0)
    assert out.loss.shape == (0,) and all(float(v) == 0.0 for v in out.metrics.values())


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("fn", PAIR_LOSSES)
def test_pair_losses_reject_bad_input(fn):
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        fn(a, a, a, torch.zeros(4), beta=0.1)
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        fn(torch.zeros(3, 2), a, a, a, beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        fn(a, t32([0.0, NAN, 0.0]), a, a, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        fn(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        fn(a, a, a, a, beta=INF)


def test_other_bad_input():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, beta=0.1, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="eta"):
        sppo_loss(a, a, a, eta=-1.0)
    with pytest.raises(ValueError, match="preference"):
        sppo_loss(a, a, torch.zeros(2), eta=1.0)
    with pytest.raises(ValueError, match="group_size"):
        sppo_rewards(torch.zeros(6), beta=1.0, group_size=4)
    with pytest.raises(ValueError, match="beta"):
        sppo_rewards(torch.zeros(4), beta=-1.0, group_size=2)
    with pytest.raises(ValueError, match="scores"):
        sppo_rewards(t32([0.0, NAN]), beta=1.0, group_size=2)
    with pytest.raises(ValueError, match="response_mask"):
        sequence_logprobs(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="logprobs"):
        sequence_logprobs(t32([[NAN, 0.0]]), torch.ones(1, 2, dtype=torch.bool))

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from rlprims.ops.losses import (
    LossOutput,
    cispo_loss,
    clip_cov_loss,
    entropy_from_logits,
    gmpo_loss,
    gspo_loss,
    kl_cov_loss,
    ppo_clip_loss,
    reinforce_loss,
    sapo_loss,
    value_loss,
)
from rlprims.ops.reduce import (
    aggregate_seq_mean_token_mean,
    aggregate_token_mean,
    loss_normalizers,
)
from tests.tolerances import EXACT

T = torch.tensor
LN = math.log
NAN, INF = float("nan"), float("inf")


def f32(x):
    return torch.tensor(x, dtype=torch.float32)


def grad_of(fn, logprobs, *args, **kwargs):
    """(output, d sum(loss) / d logprobs) for a loss whose first argument is logprobs."""
    lp = logprobs.clone().requires_grad_(True)
    out = fn(lp, *args, **kwargs)
    (g,) = torch.autograd.grad(out.loss.sum(), lp)
    return out, g


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **(tol or EXACT))


# Every policy loss with verl-like hyperparameters, called as fn(lp, old, adv, mask).
POLICY_LOSSES = {
    "ppo": lambda *a: ppo_clip_loss(*a, clip_low=0.2, clip_high=0.28, clip_dual=3.0),
    "ppo_nodual": lambda *a: ppo_clip_loss(*a, clip_low=0.2, clip_high=0.2),
    "gspo": lambda *a: gspo_loss(*a, clip_low=0.2, clip_high=0.28),
    "cispo": lambda *a: cispo_loss(*a, clip_low=0.2, clip_high=0.28),
    "sapo": lambda *a: sapo_loss(*a, tau_pos=1.0, tau_neg=1.05),
    "gmpo": lambda *a: gmpo_loss(*a, clip_low=0.4, clip_high=0.4),
    "clip_cov": lambda *a: clip_cov_loss(
        *a, clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=5.0,
        generator=torch.Generator().manual_seed(0),
    ),
    "kl_cov": lambda *a: kl_cov_loss(*a, kl_cov_ratio=0.2, ppo_kl_coef=0.1),
    "reinforce": lambda lp, old, adv, m: reinforce_loss(lp, adv, m, importance_weights=old),
    "value": lambda v, old, ret, m: value_loss(v, old, ret, m, clip_range=0.5),
}


# ------------------------------------------------------------------------------- literal examples


def _ppo_example():
    # ratios r and advantages A per token; the last token is padding holding NaN.
    r = [1.5, 0.5, 1.5, 4.0, 0.5, 1.0]
    adv = f32([[1.0, 1.0, -2.0, -1.0, -1.0, float("nan")]])
    old = torch.full((1, 6), LN(0.25))
    lp = old + f32([[LN(x) for x in r]])
    lp[0, 5] = float("nan")
    mask = T([[True, True, True, True, True, False]])
    return lp, old, adv, mask


def test_ppo_clip_literal_dual():
    lp, old, adv, mask = _ppo_example()
    out, g = grad_of(ppo_clip_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_dual=3.0)
    assert isinstance(out, LossOutput)
    # t0 r=1.5 A=+1: max(-1.5, -1.28) = -1.28, clipped (grad 0)
    # t1 r=0.5 A=+1: max(-0.5, -0.8)  = -0.5, not clipped (grad -A r = -0.5)
    # t2 r=1.5 A=-2: max(3.0, 2.56)   = 3.0; dual min(3.0, -A c = 6.0) = 3.0 (grad -A r = 3.0)
    # t3 r=4.0 A=-1: max(4.0, 1.28)   = 4.0; dual min(4.0, 3.0) = 3.0, dual binds (grad 0)
    # t4 r=0.5 A=-1: max(0.5, 0.8)    = 0.8, clipped (grad 0)
    close(out.loss, [[-1.28, -0.5, 3.0, 3.0, 0.8, 0.0]])
    close(g, [[0.0, -0.5, 3.0, 0.0, 0.0, 0.0]])
    close(out.metrics["pg_clipfrac"], 2 / 5)  # t0, t4
    close(out.metrics["pg_clipfrac_lower"], 1 / 5)  # t3
    # ppo_kl = mean(-ln r) = -(2 ln1.5 + 2 ln0.5 + ln4)/5 = -2 ln1.5 / 5
    close(out.metrics["ppo_kl"], -2 * LN(1.5) / 5)
    for v in out.metrics.values():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad


def test_ppo_clip_literal_no_dual():
    lp, old, adv, mask = _ppo_example()
    out = ppo_clip_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # t3 keeps max(4.0, 1.28) = 4.0 without the dual clip.
    close(out.loss, [[-1.28, -0.5, 3.0, 4.0, 0.8, 0.0]])
    close(out.metrics["pg_clipfrac_lower"], 0.0)


def test_gspo_literal():
    # row 0: Δ = [ln2, 0] -> log s = ln2/2, s = √2; A = +1; clip 0.2: max(-√2, -1.2) = -1.2, clipped.
    # row 1: Δ = [ln0.9] (one valid token) -> s = 0.9; A = -1: max(0.9, 0.9) = 0.9, not clipped.
    old = f32([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    lp = old + f32([[LN(2.0), 0.0, 5.0], [LN(0.9), float("inf"), 0.0]])
    adv = f32([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = T([[True, True, False], [True, False, False]])
    out, g = grad_of(gspo_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    close(out.loss, [[-1.2, -1.2, 0.0], [0.9, 0.0, 0.0]])
    # grad: row 0 clipped -> 0; row 1: -A s = 0.9
    close(g, [[0.0, 0.0, 0.0], [0.9, 0.0, 0.0]])
    close(out.metrics["pg_clipfrac"], 2 / 3)
    close(out.metrics["pg_clipfrac_lower"], 0.0)
    close(out.metrics["ppo_kl"], -(LN(2.0) + LN(0.9)) / 3)
    # verl's aggregation: seq-mean-token-mean = ((-1.2 - 1.2)/2 + 0.9/1) / 2 = -0.15
    agg = aggregate_seq_mean_token_mean(out.loss, mask, num_seqs=2)
    close(agg, -0.15)


def test_gspo_log_ratio_clamped_at_10():
    # Δ = 12 on one token: log s = 12 -> clamped to 10; A = -1: loss = max(e^10, 1.2) = e^10, grad 0.
    lp, old, adv, mask = f32([[12.0]]), f32([[0.0]]), f32([[-1.0]]), T([[True]])
    out, g = grad_of(gspo_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    close(out.loss, [[math.exp(10.0)]])
    close(g, [[0.0]])


def test_cispo_literal():
    # old = ln 0.25. t0: lp = ln0.5, r = 2 -> w = clip(2, 0.8, 1.2) = 1.2, A = +1:
    #   L = -1.2·1·ln0.5 = 1.2 ln2; grad = -w A = -1.2 (the clipped token keeps its gradient)
    # t1: lp = ln(0.25·0.9), r = 0.9 -> w = 0.9, A = -2: L = -0.9·(-2)·ln0.225 = 1.8 ln0.225; grad = 1.8
    old = torch.full((1, 3), LN(0.25))
    lp = f32([[LN(0.5), LN(0.225), float("-inf")]])
    adv = f32([[1.0, -2.0, 3.0]])
    mask = T([[True, True, False]])
    out, g = grad_of(cispo_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    close(out.loss, [[1.2 * LN(2.0), 1.8 * LN(0.225), 0.0]])
    close(g, [[-1.2, 1.8, 0.0]])
    close(out.metrics["pg_clipfrac"], 1 / 2)
    close(out.metrics["ppo_kl"], -(LN(2.0) + LN(0.9)) / 2)


def test_sapo_literal():
    # t0: r = 1, A = +1, τ = 1:    gate = σ(0)·4/1 = 2          -> L = -2
    # t1: r = 1, A = -1, τ = 1.05: gate = σ(0)·4/1.05 = 2/1.05  -> L = +2/1.05
    # t2: r = 2, A = +1, τ = 1:    gate = 4σ(1) = 2.9242344     -> L = -4σ(1)
    #     grad = -A·4·σ(1)(1-σ(1))·τ·r/τ = -8σ(1)(1-σ(1))
    # t3: A = 0 (τ_neg): L = 0
    s1 = 1 / (1 + math.exp(-1.0))
    old = f32([[-1.0, -1.0, -1.0, -1.0]])
    lp = old + f32([[0.0, 0.0, LN(2.0), 0.3]])
    adv = f32([[1.0, -1.0, 1.0, 0.0]])
    mask = T([[True, True, True, True]])
    out, g = grad_of(sapo_loss, lp, old, adv, mask, tau_pos=1.0, tau_neg=1.05)
    close(out.loss, [[-2.0, 2 / 1.05, -4 * s1, 0.0]])
    close(g, [[-1.0, 1.0, -8 * s1 * (1 - s1), 0.0]])
    close(out.metrics["pg_clipfrac"], 0.0)
    close(out.metrics["ppo_kl"], -(LN(2.0) + 0.3) / 4)


def test_gmpo_literal():
    # clip_low = 0.1, clip_high = 0.2 (log space).
    # row 0, A = +1, Δ = [0.5, -0.3]: Δ' = [min(0.5, 0.2), -0.3] = [0.2, -0.3]; mean -0.05
    #   L0 = -1·e^-0.05
    # row 1, A = -1, Δ = [0.5, -0.3, 0.0]: Δ' = [0.5, max(-0.3, -0.1), 0.0] = [0.5, -0.1, 0]; mean 0.4/3
    #   L1 = +e^(0.4/3)
    # row 2, A = 0, Δ = [0.7]: Δ' = 0 -> L2 = -0·1 = 0.   row 3: no valid token -> 0.
    old = torch.zeros(4, 3)
    lp = f32([[0.5, -0.3, 9.0], [0.5, -0.3, 0.0], [0.7, 0.0, 0.0], [1.0, 2.0, 3.0]])
    adv = f32([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = T([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()
    lp_ = lp.clone().requires_grad_(True)
    out = gmpo_loss(lp_, old, adv, mask, clip_low=0.1, clip_high=0.2)
    L0, L1 = -math.exp(-0.05), math.exp(0.4 / 3)
    close(out.loss, [[L0, L0, 0.0], [L1, L1, L1], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # outside the band [-0.1, 0.2]: row 0 both (A > 0); row 1 tokens 0, 1 (A < 0); row 2 not counted (A = 0)
    close(out.metrics["pg_clipfrac"], 2 / 6)
    close(out.metrics["pg_clipfrac_lower"], 2 / 6)
    close(out.metrics["ppo_kl"], -(0.5 - 0.3 + 0.5 - 0.3 + 0.0 + 0.7) / 6)
    # seq-mean-token-mean over the 3 non-empty rows = (L0 + L1 + 0) / 3 = verl's mean of sequence losses
    agg = aggregate_seq_mean_token_mean(out.loss, mask, num_seqs=loss_normalizers(mask).num_seqs)
    close(agg, (L0 + L1) / 3)
    (g,) = torch.autograd.grad(agg, lp_)
    # d agg / dΔ = (1/3) dL_i/dΔ: row 0 token 1: -e^-0.05/2; row 1 tokens 0, 2: e^(0.4/3)/3; clipped: 0
    close(g, [[0.0, L0 / 2 / 3, 0.0], [L1 / 3 / 3, 0.0, L1 / 3 / 3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def _cov_example():
    # A = [2, -3, 1, 0] (mean 0); lp = [0, -4, -2, -2] (mean -2, centred [2, -2, 0, 0])
    # cov = A·(lp - mean) = [4, 6, 0, 0]
    adv = f32([[2.0, -3.0], [1.0, 0.0]])
    lp = f32([[0.0, -4.0], [-2.0, -2.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    return lp, adv, mask


def test_clip_cov_literal():
    lp, adv, mask = _cov_example()
    # on-policy (ratio 1, nothing PPO-clipped); only token (0, 0) has 1 < cov=4 < 5 -> zeroed.
    # k = max(1, int(0.1·4)) = 1. loss = -A·1 = [-2, 3, -1, 0] -> [0, 3, -1, 0]
    out, g = grad_of(
        clip_cov_loss, lp, lp.clone(), adv, mask,
        clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.1, clip_cov_lb=1.0, clip_cov_ub=5.0,
    )
    close(out.loss, [[0.0, 3.0], [-1.0, 0.0]])
    close(g, [[0.0, 3.0], [-1.0, 0.0]])
    close(out.metrics["pg_clipfrac"], 1 / 4)
    close(out.metrics["ppo_kl"], 0.0)
    assert set(out.metrics) == {"pg_clipfrac", "ppo_kl"}


def test_kl_cov_literal():
    lp, adv, mask = _cov_example()
    delta = f32([[0.1, -0.2], [0.3, 0.0]])
    # k = max(1, int(4·0.5)) = 2 -> the two largest cov (6 at (0,1), 4 at (0,0)) get + 0.1·|Δ|
    # (0,0): -2e^0.1 + 0.01;  (0,1): 3e^-0.2 + 0.02;  (1,0): -e^0.3;  (1,1): 0
    out, g = grad_of(kl_cov_loss, lp, lp - delta, adv, mask, kl_cov_ratio=0.5, ppo_kl_coef=0.1)
    close(out.loss, [[-2 * math.exp(0.1) + 0.01, 3 * math.exp(-0.2) + 0.02], [-math.exp(0.3), 0.0]])
    # grad: -A e^Δ + coef·sign(Δ) on selected tokens
    close(g, [[-2 * math.exp(0.1) + 0.1, 3 * math.exp(-0.2) - 0.1], [-math.exp(0.3), 0.0]])
    close(out.metrics["ppo_kl"], (0.1 + 0.2 + 0.3 + 0.0) / 4)  # verl: mean |Δ| under this name


def test_reinforce_literal():
    # L = -A·lp·w: [-(0.5)(-1)(2), -(-1)(-2)(0.5)] = [1.0, -1.0]; grad = -A·w = [-(0.5)(2), -(-1)(0.5)]
    lp, adv, w = f32([[-1.0, -2.0, float("nan")]]), f32([[0.5, -1.0, 1.0]]), f32([[2.0, 0.5, float("inf")]])
    mask = T([[True, True, False]])
    out, g = grad_of(reinforce_loss, lp, adv, mask, importance_weights=w)
    close(out.loss, [[1.0, -1.0, 0.0]])
    close(g, [[-1.0, 0.5, 0.0]])
    assert out.metrics == {}
    # without weights: [-(0.5)(-1), -(-1)(-2)] = [0.5, -2.0]
    close(reinforce_loss(lp, adv, mask).loss, [[0.5, -2.0, 0.0]])


def test_value_loss_literal():
    # clip_range 0.5.  Vc = clip(V, V_old ± 0.5)
    # t0: V=1, Vold=0, R=0: Vc=0.5; (1)², (0.5)² -> ½·1 = 0.5, not clipped; grad = V - R = 1
    # t1: V=2, Vold=1.8, R=3: Vc=2; 1, 1 -> 0.5 (tie, not counted); grad = -1
    # t2: V=2, Vold=0, R=3: Vc=0.5; 1, 6.25 -> ½·6.25 = 3.125, clipped; grad 0 (clamp saturated)
    # t3: padding
    v = f32([[1.0, 2.0, 2.0, float("nan")]])
    old = f32([[0.0, 1.8, 0.0, 0.0]])
    ret = f32([[0.0, 3.0, 3.0, float("inf")]])
    mask = T([[True, True, True, False]])
    out, g = grad_of(value_loss, v, old, ret, mask, clip_range=0.5)
    close(out.loss, [[0.5, 0.5, 3.125, 0.0]])
    close(g, [[1.0, -1.0, 0.0, 0.0]])
    close(out.metrics["vf_clipfrac"], 1 / 3)


def test_entropy_literal():
    logits = f32([[0.0, 0.0], [0.0, LN(3.0)], [1e4, -1e4], [1e4, 1e4], [-1e4, -1e4]])
    # [0,0]: ln2. [0, ln3]: p = [1/4, 3/4], H = -(¼ln¼ + ¾ln¾). [1e4, -1e4]: p = [1, e^-2e4 = 0], H = 0.
    h = entropy_from_logits(logits)
    close(h, [LN(2), -(0.25 * LN(0.25) + 0.75 * LN(0.75)), 0.0, LN(2), LN(2)])
    # -inf logits (banned tokens) are fine, and their gradient is 0
    z = f32([[0.0, 0.0, float("-inf")]]).requires_grad_(True)
    h = entropy_from_logits(z)
    close(h, [LN(2)])
    (g,) = torch.autograd.grad(h.sum(), z)
    assert torch.isfinite(g).all()
    close(g, [[0.0, 0.0, 0.0]])


def test_entropy_matches_categorical():
    logits = torch.randn(3, 5, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    z = logits.clone().requires_grad_(True)
    h = entropy_from_logits(z)
    zr = logits.clone().requires_grad_(True)
    hr = torch.distributions.Categorical(logits=zr).entropy()
    close(h, hr)
    close(torch.autograd.grad(h.sum(), z)[0], torch.autograd.grad(hr.sum(), zr)[0])


# ------------------------------------------------------------------------------------- identities


def _random_batch(seed, B=4, T=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return lp, old, adv, mask


@pytest.mark.parametrize("clip_dual", [None, 3.0])
def test_on_policy_ppo_gradient_is_reinforce(clip_dual):
    lp, _, adv, mask = _random_batch(1)
    old = lp.detach().clone()
    _, g_ppo = grad_of(ppo_clip_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_dual=clip_dual)
    _, g_rf = grad_of(reinforce_loss, lp, adv, mask)
    close(g_ppo, g_rf)


@pytest.mark.parametrize(
    "fn",
    [
        lambda *a: sapo_loss(*a, tau_pos=1.0, tau_neg=1.05),
        lambda *a: cispo_loss(*a, clip_low=0.2, clip_high=0.28),
        lambda *a: gspo_loss(*a, clip_low=0.2, clip_high=0.28),
    ],
    ids=["sapo", "cispo", "gspo"],
)
def test_on_policy_gradient_is_reinforce_other_losses(fn):
    # SAPO: d/dlogπ [σ(τ(ρ-1))·4/τ] = σ'(0)·τ·4/τ = 1 at ρ = 1; CISPO: weight 1; GSPO: s = 1.
    lp, _, adv, mask = _random_batch(2)
    _, g = grad_of(fn, lp, lp.detach().clone(), adv, mask)
    _, g_rf = grad_of(reinforce_loss, lp, adv, mask)
    close(g, g_rf)


def test_gspo_one_token_equals_ppo():
    lp, old, adv, _ = _random_batch(3, B=6, T=1)
    lp = old + torch.linspace(-0.5, 0.5, 6, dtype=lp.dtype)[:, None]  # some clipped, some not
    mask = torch.ones(6, 1, dtype=torch.bool)
    out_g, g_g = grad_of(gspo_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    out_p, g_p = grad_of(ppo_clip_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(out_g.loss, out_p.loss)
    close(g_g, g_p)
    for k in out_p.metrics:
        close(out_g.metrics[k], out_p.metrics[k])
    assert 0 < out_p.metrics["pg_clipfrac"] < 1


def test_gmpo_one_token_equals_ppo():
    # One token: GMPO = -A·exp(one-sided clip of Δ), PPO = max(-Aρ, -A clip(ρ)) = the same one-sided clip
    # of ρ, when the log-space bounds are ln(1 + ε_high) and -ln(1 - ε_low).
    lp, old, adv, _ = _random_batch(4, B=8, T=1)
    lp = old + torch.linspace(-0.6, 0.6, 8, dtype=lp.dtype)[:, None]
    mask = torch.ones(8, 1, dtype=torch.bool)
    out_m, g_m = grad_of(gmpo_loss, lp, old, adv, mask, clip_low=-LN(0.8), clip_high=LN(1.28))
    out_p, g_p = grad_of(ppo_clip_loss, lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(out_m.loss, out_p.loss)
    close(g_m, g_p)


def test_clip_cov_without_candidates_is_ppo():
    lp, old, adv, mask = _random_batch(5)
    kw = dict(clip_low=0.2, clip_high=0.28)
    out_c, g_c = grad_of(clip_cov_loss, lp, old, adv, mask, **kw, clip_cov_ratio=0.5, clip_cov_lb=1e6,
                         clip_cov_ub=1e7)
    out_p, g_p = grad_of(ppo_clip_loss, lp, old, adv, mask, **kw)
    close(out_c.loss, out_p.loss)
    close(g_c, g_p)
    close(out_c.metrics["pg_clipfrac"], 0.0)


def test_kl_cov_without_penalty_is_unclipped_ppo():
    lp, old, adv, mask = _random_batch(6)
    out_k, g_k = grad_of(kl_cov_loss, lp, old, adv, mask, kl_cov_ratio=0.5, ppo_kl_coef=0.0)
    # clip(ρ, 0, 1e30) never binds: PPO reduces to -Aρ
    out_p, g_p = grad_of(ppo_clip_loss, lp, old, adv, mask, clip_low=1.0, clip_high=1e30)
    close(out_k.loss, out_p.loss)
    close(g_k, g_p)


def test_reinforce_unit_weights():
    lp, _, adv, mask = _random_batch(7)
    close(reinforce_loss(lp, adv, mask, importance_weights=torch.ones_like(lp)).loss,
          reinforce_loss(lp, adv, mask).loss)


def test_old_logprobs_and_advantages_are_constants():
    lp, old, adv, mask = _random_batch(8)
    old = old.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    out = ppo_clip_loss(lp.requires_grad_(True), old, adv, mask, clip_low=0.2, clip_high=0.2)
    g_old, g_adv = torch.autograd.grad(out.loss.sum(), (old, adv), allow_unused=True)
    assert g_old is None and g_adv is None


def test_low_precision_inputs():
    lp, old, adv, mask = (x if x.dtype == torch.bool else x.bfloat16() for x in _random_batch(9))
    out = ppo_clip_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_dual=3.0)
    assert out.loss.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in out.metrics.values())
    assert entropy_from_logits(torch.randn(3, 5).bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------- verl's numbers (its formulas restated, float64)
# Written as verl writes them (products with the mask, its aggregation), for inputs without NaN padding.


def _mmean(x, m):
    return (x * m).sum() / (m.sum() + 1e-8)


def _verl_ppo(old, lp, adv, m, el, eh, c):
    d = (lp - old).clamp(-20, 20)
    r = d.exp()
    l1, l2 = -adv * r, -adv * r.clamp(1 - el, 1 + eh)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * c
    pg = torch.where(adv < 0, torch.min(l3, c1), c1)
    lower = (c1 > l3) * (adv < 0).double()
    return _mmean(pg, m), _mmean((l2 > l1).double(), m), _mmean(-d, m), _mmean(lower, m)


def _verl_seq_mean_token_mean(x, m):
    return ((x * m).sum(-1) / m.sum(-1)).mean()


def _verl_gspo(old, lp, adv, m, el, eh):
    d = lp - old
    seq = (d * m).sum(-1) / m.sum(-1).clamp(min=1)
    lr = (lp - lp.detach() + seq.detach()[:, None]).clamp(max=10.0)
    r = lr.exp()
    l1, l2 = -adv * r, -adv * r.clamp(1 - el, 1 + eh)
    return _verl_seq_mean_token_mean(torch.maximum(l1, l2), m), _mmean((l2 > l1).double(), m)


def _verl_sapo(old, lp, adv, m, tp, tn):
    r = (lp - old).clamp(-20, 20).exp()
    tau = torch.where(adv > 0, torch.tensor(tp, dtype=r.dtype), torch.tensor(tn, dtype=r.dtype))
    return _verl_seq_mean_token_mean(-torch.sigmoid(tau * (r - 1)) * (4 / tau) * adv, m)


def _verl_cispo(old, lp, adv, m, el, eh):
    r = (lp - old).clamp(-20, 20).exp()
    return _mmean(-r.clamp(1 - el, 1 + eh).detach() * adv * lp, m)


def _verl_gmpo(old, lp, adv, m, el, eh):
    d = lp - old
    s = torch.sign(adv)
    dmin = s * torch.min(s * d, s * d.clamp(-el, eh))
    n = m.sum(-1)
    ratio = torch.exp((dmin * m).sum(-1) / (n + 1e-8))
    a = (adv * m).sum(-1) / (n + 1e-8)
    return (-a * ratio).mean()


def _verl_value(v, old, ret, m, c):
    vc = torch.clamp(v, old - c, old + c)
    l1, l2 = (v - ret) ** 2, (vc - ret) ** 2
    return 0.5 * _mmean(torch.max(l1, l2), m), _mmean((l2 > l1).double(), m)


def _rows_constant(adv):
    return adv[:, :1].expand_as(adv).clone()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_verl_numbers(seed):
    lp, old, adv, mask = _random_batch(10 + seed, B=5, T=9)
    lp = old + 0.5 * (lp - old) / 0.3  # wider ratios so that clipping happens
    m = mask.double()
    el, eh = 0.2, 0.28

    def both(ours, ref, adv=adv):
        a = lp.clone().requires_grad_(True)
        b = lp.clone().requires_grad_(True)
        x, y = ours(a, adv), ref(b, adv)
        close(x, y)
        close(torch.autograd.grad(x, a)[0], torch.autograd.grad(y, b)[0])

    n = loss_normalizers(mask)
    tok = lambda L: aggregate_token_mean(L, mask, num_tokens=n.num_tokens)  # noqa: E731
    smtm = lambda L: aggregate_seq_mean_token_mean(L, mask, num_seqs=n.num_seqs)  # noqa: E731

    both(lambda a, A: tok(ppo_clip_loss(a, old, A, mask, clip_low=el, clip_high=eh, clip_dual=3.0).loss),
         lambda b, A: _verl_ppo(old, b, A, m, el, eh, 3.0)[0])
    out = ppo_clip_loss(lp, old, adv, mask, clip_low=el, clip_high=eh, clip_dual=3.0)
    _, cf, kl, cfl = _verl_ppo(old, lp, adv, m, el, eh, 3.0)
    close(out.metrics["pg_clipfrac"], cf.float())
    close(out.metrics["ppo_kl"], kl.float())
    close(out.metrics["pg_clipfrac_lower"], cfl.float())
    assert cf > 0
    both(lambda a, A: smtm(gspo_loss(a, old, A, mask, clip_low=el, clip_high=eh).loss),
         lambda b, A: _verl_gspo(old, b, A, m, el, eh)[0], adv=_rows_constant(adv))
    both(lambda a, A: smtm(sapo_loss(a, old, A, mask, tau_pos=1.0, tau_neg=1.05).loss),
         lambda b, A: _verl_sapo(old, b, A, m, 1.0, 1.05))
    both(lambda a, A: tok(cispo_loss(a, old, A, mask, clip_low=el, clip_high=eh).loss),
         lambda b, A: _verl_cispo(old, b, A, m, el, eh))
    both(lambda a, A: smtm(gmpo_loss(a, old, A, mask, clip_low=0.1, clip_high=0.15).loss),
         lambda b, A: _verl_gmpo(old, b, A, m, 0.1, 0.15))
    # value loss, with lp as V
    ret = old + adv
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    ours = value_loss(a, old, ret, mask, clip_range=0.2)
    ref, ref_cf = _verl_value(b, old, ret, m, 0.2)
    close(tok(ours.loss), ref)
    close(torch.autograd.grad(tok(ours.loss), a)[0], torch.autograd.grad(ref, b)[0])
    close(ours.metrics["vf_clipfrac"], ref_cf.float())


# ---------------------------------------------------------------------------- clip-cov randomness


def test_clip_cov_generator_controls_selection():
    g = torch.Generator().manual_seed(0)
    B, Tn = 20, 50
    adv = torch.randn(B, 1, generator=g).expand(B, Tn).contiguous()
    lp = -torch.rand(B, Tn, generator=g) * 4
    mask = torch.ones(B, Tn, dtype=torch.bool)
    kw = dict(clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.01, clip_cov_lb=0.0, clip_cov_ub=100.0)
    runs = [
        clip_cov_loss(lp, lp, adv, mask, **kw, generator=torch.Generator().manual_seed(s)).loss
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # k = int(0.01·1000) = 10 tokens zeroed out of the many candidates (cov > 0 for about half)
    assert int((runs[0] == 0).sum()) == 10


def test_clip_cov_never_drops_ppo_clipped_or_masked_tokens():
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(6, 10, generator=g)
    old = -torch.rand(6, 10, generator=g) * 3
    lp = old + torch.randn(6, 10, generator=g)
    mask = torch.rand(6, 10, generator=g) > 0.3
    kw = dict(clip_low=0.2, clip_high=0.2, clip_cov_ratio=1.0, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    out = clip_cov_loss(lp, old, adv, mask, **kw, generator=torch.Generator().manual_seed(0))
    ppo = ppo_clip_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    r = torch.exp(lp - old)
    ppo_clipped = mask & ((-adv * r.clamp(0.8, 1.2)) > (-adv * r))
    # ratio 1.0: every unclipped valid token is a candidate and k = N_tok, so all of them are zeroed
    assert torch.equal(out.loss[ppo_clipped], ppo.loss[ppo_clipped])
    assert (out.loss[mask & ~ppo_clipped] == 0).all()
    close(out.metrics["pg_clipfrac"], (mask & ~ppo_clipped).sum() / mask.sum())


# --------------------------------------------------------------------------------------- hypothesis

_floats = st.floats(-3.0, 3.0, allow_nan=False, width=32)
_junk = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0, 7.0])


@st.composite
def _masked_batch(draw):
    B = draw(st.integers(1, 4))
    Tn = draw(st.integers(1, 6))

    def tensor():
        values = draw(st.lists(_floats, min_size=B * Tn, max_size=B * Tn))
        return torch.tensor(values, dtype=torch.float32).view(B, Tn)

    old = -tensor().abs()
    lp = old + 0.5 * tensor() / 3
    adv = tensor()
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * Tn, max_size=B * Tn))).view(B, Tn)
    junk = [torch.full((B, Tn), draw(_junk)) for _ in range(3)]
    return lp, old, adv, mask, junk


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
@given(batch=_masked_batch())
def test_masked_values_never_matter(name, batch):
    fn = POLICY_LOSSES[name]
    lp, old, adv, mask, junk = batch
    dirty = [torch.where(mask, x, j) for x, j in zip((lp, old, adv), junk)]
    out_c, g_c = grad_of(fn, lp, old, adv, mask)
    out_d, g_d = grad_of(fn, dirty[0], dirty[1], dirty[2], mask)
    exact = dict(rtol=0.0, atol=0.0)
    close(out_d.loss, out_c.loss, **exact)
    close(g_d, g_c, **exact)
    assert set(out_d.metrics) == set(out_c.metrics)
    for k in out_c.metrics:
        close(out_d.metrics[k], out_c.metrics[k], **exact)
    # and everything is finite, padding is 0, all-masked rows are 0
    assert torch.isfinite(out_c.loss).all() and torch.isfinite(g_c).all()
    assert (out_c.loss[~mask] == 0).all() and (g_c[~mask] == 0).all()
    for v in out_c.metrics.values():
        assert torch.isfinite(v) and not v.requires_grad
    if not mask.any():
        for v in out_c.metrics.values():
            assert v == 0


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_all_masked_batch_is_zero(name):
    nan = torch.full((3, 4), NAN)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out, g = grad_of(POLICY_LOSSES[name], nan, nan, nan, mask)
    assert torch.equal(out.loss, torch.zeros(3, 4)) and torch.equal(g, torch.zeros(3, 4))
    assert all(v == 0 for v in out.metrics.values())


@given(
    v=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=12),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_entropy_finite_nonnegative(v, dtype):
    z = torch.tensor(v, dtype=dtype).requires_grad_(True)
    h = entropy_from_logits(z)
    assert torch.isfinite(h) and h >= 0
    assert h <= LN(len(v)) + 1e-5
    (g,) = torch.autograd.grad(h, z)
    assert torch.isfinite(g).all()


def test_entropy_large_logits_no_cancellation():
    # The direct form logsumexp(z) - Σ p z cancels two numbers ~1e4 and goes negative in fp32.
    z = torch.tensor([1e4, 1e4 - 0.7, 1e4 - 30.0, -1e4], dtype=torch.float32)
    h = entropy_from_logits(z)
    expected = entropy_from_logits(z.double())
    close(h, expected.float())
    # Two top logits ~1e4 that are 5..15 apart (H ~ 1e-6..1e-2): the direct form goes negative here.
    d = 5 + 10 * torch.rand(1000, 1, generator=torch.Generator().manual_seed(0))
    z = torch.cat([torch.full((1000, 1), 1e4), 1e4 - d, torch.full((1000, 3), -1e4)], dim=-1)
    direct = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
    assert (direct < 0).any()  # what this test guards against
    h = entropy_from_logits(z)
    assert (h >= 0).all()
    close(h, entropy_from_logits(z.double()).float())


# ------------------------------------------------------------------------------------- bad inputs


def _ok():
    lp, old, adv, mask = _random_batch(0, B=2, T=3, dtype=torch.float32)
    return lp, old, adv, mask


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_bad_shapes_and_mask(name):
    fn = POLICY_LOSSES[name]
    lp, old, adv, mask = _ok()
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        fn(lp, old, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match="2 dims"):
        fn(lp[0], old[0], adv[0], mask[0])
    with pytest.raises(ValueError, match="bool"):
        fn(lp, old, adv, mask.float())
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        fn(lp, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="floating"):
        fn(lp, old.long(), adv, mask)
    with pytest.raises(ValueError, match="torch.Tensor"):
        fn(lp, old, adv.tolist(), mask)


def test_bad_shape_message_names_argument():
    lp, old, adv, mask = _ok()
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 4\) but logprobs has shape \(2, 3\)"):
        ppo_clip_loss(lp, old, torch.zeros(2, 4), mask, clip_low=0.2, clip_high=0.2)
    with pytest.raises(ValueError, match="importance_weights"):
        reinforce_loss(lp, adv, mask, importance_weights=torch.ones(3, 3))
    with pytest.raises(ValueError, match="returns"):
        value_loss(lp, old, torch.zeros(2, 2), mask, clip_range=0.2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a: ppo_clip_loss(*a, clip_low=NAN, clip_high=0.2), "clip_low"),
        (lambda a: ppo_clip_loss(*a, clip_low=0.2, clip_high=INF), "clip_high"),
        (lambda a: ppo_clip_loss(*a, clip_low=-0.1, clip_high=0.2), "clip_low"),
        (lambda a: ppo_clip_loss(*a, clip_low=1.5, clip_high=0.2), "clip_low"),
        (lambda a: ppo_clip_loss(*a, clip_low=0.2, clip_high=0.2, clip_dual=1.0), "clip_dual"),
        (lambda a: ppo_clip_loss(*a, clip_low=0.2, clip_high=0.2, clip_dual=0.5), "clip_dual"),
        (lambda a: ppo_clip_loss(*a, clip_low=0.2, clip_high=0.2, clip_dual=INF), "clip_dual"),
        (lambda a: ppo_clip_loss(*a, clip_low=True, clip_high=0.2), "clip_low"),
        (lambda a: ppo_clip_loss(*a, clip_low="0.2", clip_high=0.2), "clip_low"),
        (lambda a: gspo_loss(*a, clip_low=0.2, clip_high=-1.0), "clip_high"),
        (lambda a: cispo_loss(*a, clip_low=0.2, clip_high=NAN), "clip_high"),
        (lambda a: sapo_loss(*a, tau_pos=0.0, tau_neg=1.05), "tau_pos"),
        (lambda a: sapo_loss(*a, tau_pos=1.0, tau_neg=INF), "tau_neg"),
        (lambda a: gmpo_loss(*a, clip_low=-0.4, clip_high=0.4), "clip_low"),
        (lambda a: clip_cov_loss(*a, clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.0, clip_cov_lb=1.0,
                                 clip_cov_ub=5.0), "clip_cov_ratio"),
        (lambda a: clip_cov_loss(*a, clip_low=0.2, clip_high=0.2, clip_cov_ratio=2e-4, clip_cov_lb=5.0,
                                 clip_cov_ub=1.0), "clip_cov_lb"),
        (lambda a: clip_cov_loss(*a, clip_low=0.2, clip_high=0.2, clip_cov_ratio=2e-4, clip_cov_lb=1.0,
                                 clip_cov_ub=INF), "clip_cov_ub"),
        (lambda a: clip_cov_loss(*a, clip_low=0.2, clip_high=0.2, clip_cov_ratio=2e-4, clip_cov_lb=1.0,
                                 clip_cov_ub=5.0, generator=0), "generator"),
        (lambda a: kl_cov_loss(*a, kl_cov_ratio=1.5, ppo_kl_coef=0.1), "kl_cov_ratio"),
        (lambda a: kl_cov_loss(*a, kl_cov_ratio=2e-4, ppo_kl_coef=-0.1), "ppo_kl_coef"),
        (lambda a: value_loss(*a, clip_range=NAN), "clip_range"),
    ],
)
def test_bad_hyperparameters(call, match):
    with pytest.raises(ValueError, match=match):
        call(_ok())


def test_entropy_bad_input():
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits([0.0, 1.0])


def test_hyperparameters_are_keyword_only_and_required():
    lp, old, adv, mask = _ok()
    with pytest.raises(TypeError):
        ppo_clip_loss(lp, old, adv, mask, 0.2, 0.2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        sapo_loss(lp, old, adv, mask)  # type: ignore[call-arg]

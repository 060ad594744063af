"""Tests for rlprims/ops/correction.py: literal examples, identities, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from rlprims.ops.correction import (
    mismatch_k1,
    mismatch_k2,
    mismatch_k3,
    normalize_sequence_is_weights,
    normalize_token_is_weights,
    rollout_correction_metrics,
    seq_max_rejection_mask,
    seq_mean_rejection_mask,
    seq_sum_rejection_mask,
    sequence_is_metrics,
    sequence_is_weights,
    token_is_metrics,
    token_is_weights,
    token_rejection_mask,
)
from tests.tolerances import EXACT, REORDER

NAN, INF = float("nan"), float("inf")
T_, F_ = True, False
REJECTIONS = [token_rejection_mask, seq_sum_rejection_mask, seq_mean_rejection_mask, seq_max_rejection_mask]
MISMATCH = [mismatch_k1, mismatch_k2, mismatch_k3]


def t32(x):
    return torch.tensor(x, dtype=torch.float32)


def bmask(x):
    return torch.tensor(x, dtype=torch.bool)


# Shared literal batch. Row 1's last token is padding (NaN in the rollout log-prob, 7 in the trainer's).
#   Δ = old − rollout = [[0.5, 0, −1], [0, 0.3, ·]]
OLD = t32([[-1.0, -0.5, -2.0], [-0.3, -0.1, 7.0]])
ROLLOUT = t32([[-1.5, -0.5, -1.0], [-0.3, -0.4, NAN]])
MASK = bmask([[T_, T_, T_], [T_, T_, F_]])
E = math.exp


# ----------------------------------------------------------------------------------------------------
# Literal examples


def test_mismatch_estimators_literal():
    # k1 = −Δ;  k2 = ½Δ²;  k3 = e^Δ − 1 − Δ   (valid positions)
    m = MASK
    assert_close(mismatch_k1(OLD, ROLLOUT)[m], t32([-0.5, 0.0, 1.0, 0.0, -0.3]), **EXACT)
    assert_close(mismatch_k2(OLD, ROLLOUT)[m], t32([0.125, 0.0, 0.5, 0.0, 0.045]), **EXACT)
    k3 = [E(0.5) - 1.5, 0.0, E(-1.0), 0.0, E(0.3) - 1.3]  # 0.148721, 0, 0.367879, 0, 0.049859
    assert_close(mismatch_k3(OLD, ROLLOUT)[m], t32(k3), **EXACT)
    # Clamp of Δ to ±20: Δ = 50 -> k3 = e^20 − 21, k1 = −20.
    big = t32([[50.0]])
    assert_close(mismatch_k3(big, torch.zeros(1, 1)), t32([[E(20.0) - 21.0]]), **EXACT)
    assert_close(mismatch_k1(big, torch.zeros(1, 1)), t32([[-20.0]]), **EXACT)


def test_token_is_weights_literal():
    # w = min(e^Δ, 1.5): row 0 [min(1.6487, 1.5) = 1.5, 1, e^−1 = 0.367879]
    #                   row 1 [1, e^0.3 = 1.349859, pad 0]
    w = token_is_weights(OLD, ROLLOUT, MASK, clip_max=1.5)
    assert_close(w, t32([[1.5, 1.0, E(-1.0)], [1.0, E(0.3), 0.0]]), **EXACT)
    assert not w.requires_grad


def test_sequence_is_weights_literal():
    # Row 0: ΣΔ = 0.5 + 0 − 1 = −0.5 -> e^−0.5 = 0.606531 on 3 tokens; row 1: ΣΔ = 0.3 -> 1.349859 (< C = 2).
    w = sequence_is_weights(OLD, ROLLOUT, MASK, clip_max=2.0)
    assert_close(w, t32([[E(-0.5)] * 3, [E(0.3), E(0.3), 0.0]]), **EXACT)
    # C = 1.2 truncates row 1 to 1.2.
    w = sequence_is_weights(OLD, ROLLOUT, MASK, clip_max=1.2)
    assert_close(w, t32([[E(-0.5)] * 3, [1.2, 1.2, 0.0]]), **EXACT)


def test_normalize_literal():
    # Token: weights {1.5, 1, e^−1, 1, e^0.3}, mean = 5.217738/5 = 1.0435476.
    w = token_is_weights(OLD, ROLLOUT, MASK, clip_max=1.5)
    mean = (1.5 + 1.0 + E(-1.0) + 1.0 + E(0.3)) / 5
    assert_close(normalize_token_is_weights(w, MASK), w / mean, **EXACT)
    # Sequence: per-row weights {e^−0.5, e^0.3}, mean = (0.606531 + 1.349859)/2 = 0.978195.
    ws = sequence_is_weights(OLD, ROLLOUT, MASK, clip_max=2.0)
    mean_s = (E(-0.5) + E(0.3)) / 2
    assert_close(normalize_sequence_is_weights(ws, MASK), ws / mean_s, **EXACT)
    # Whatever sits under a False mask (here NaN) comes back as 0 and changes nothing else.
    for fn, x in ((normalize_token_is_weights, w), (normalize_sequence_is_weights, ws)):
        dirty = torch.where(MASK, x, torch.tensor(NAN))
        assert torch.equal(fn(dirty, MASK), fn(x, MASK))
        assert bool((fn(dirty, MASK)[~MASK] == 0).all())


def test_rejection_masks_literal():
    # k2 = [[0.125, 0, 0.5], [0, 0.045, ·]]
    #   token, max 0.1:            [[F, T, F], [T, T, F]]
    #   seq mean k2 = [0.208333, 0.0225], max 0.2:      row 0 out
    #   seq max  k2 = [0.5, 0.045],       max 0.3:      row 0 out;  max 0.6: both kept
    # k1 = −Δ = [[−0.5, 0, 1], [0, −0.3, ·]]
    #   token, ratio bounds [0.5, 2] -> [log 0.5, log 2] = [−0.693, 0.693]: [[T, T, F], [T, T, F]]
    #   seq sum k1 = [0.5, −0.3], bounds [−0.4, 0.4]:   row 0 out
    #   seq sum k1, bounds [−0.2, 0.6]:                  row 1 out
    kw = {"estimator": mismatch_k2}
    assert torch.equal(
        token_rejection_mask(OLD, ROLLOUT, MASK, **kw, max_value=0.1), bmask([[F_, T_, F_], [T_, T_, F_]])
    )
    assert torch.equal(
        seq_mean_rejection_mask(OLD, ROLLOUT, MASK, **kw, max_value=0.2), bmask([[F_, F_, F_], [T_, T_, F_]])
    )
    assert torch.equal(
        seq_max_rejection_mask(OLD, ROLLOUT, MASK, **kw, max_value=0.3), bmask([[F_, F_, F_], [T_, T_, F_]])
    )
    assert torch.equal(seq_max_rejection_mask(OLD, ROLLOUT, MASK, **kw, max_value=0.6), MASK)
    #   seq mean k2 ≤ 0.5 keeps both rows; seq sum k2 = [0.625, 0.045] ≤ 0.5 drops row 0
    assert torch.equal(seq_mean_rejection_mask(OLD, ROLLOUT, MASK, **kw, max_value=0.5), MASK)
    assert torch.equal(
        seq_sum_rejection_mask(OLD, ROLLOUT, MASK, **kw, max_value=0.5), bmask([[F_, F_, F_], [T_, T_, F_]])
    )
    k1 = {"estimator": mismatch_k1}
    assert torch.equal(
        token_rejection_mask(OLD, ROLLOUT, MASK, **k1, min_value=math.log(0.5), max_value=math.log(2.0)),
        bmask([[T_, T_, F_], [T_, T_, F_]]),
    )
    assert torch.equal(
        seq_sum_rejection_mask(OLD, ROLLOUT, MASK, **k1, min_value=-0.4, max_value=0.4),
        bmask([[F_, F_, F_], [T_, T_, F_]]),
    )
    assert torch.equal(
        seq_sum_rejection_mask(OLD, ROLLOUT, MASK, **k1, min_value=-0.2, max_value=0.6),
        bmask([[T_, T_, T_], [F_, F_, F_]]),
    )


def test_rejection_accepts_a_custom_estimator():
    # Any (old, rollout) -> [B, T] function works, e.g. |Δ|: [[0.5, 0, 1], [0, 0.3, ·]], max 0.4.
    def abs_delta(old, rollout):
        return (old - rollout).abs()

    out = token_rejection_mask(OLD, ROLLOUT, MASK, estimator=abs_delta, max_value=0.4)
    assert torch.equal(out, bmask([[F_, T_, F_], [T_, T_, F_]]))


def test_metrics_literal():
    # Valid Δ = {0.5, 0, −1, 0, 0.3}.
    #   kl = mean(−Δ) = 0.2/5 = 0.04;  k3_kl = (0.148721 + 0.367879 + 0.049859)/5 = 0.113292
    #   ℓ_old = [−3.5/3, −0.2], ℓ_rollout = [−1, −0.35]
    #   training_log_ppl = (1.166667 + 0.2)/2 = 0.683333;  training_ppl = (e^1.166667 + e^0.2)/2 = 2.216337
    #   rollout_log_ppl = (1 + 0.35)/2 = 0.675;            rollout_ppl = (e + e^0.35)/2 = 2.068675
    #   log_ppl_diff per row = ℓ_r − ℓ_o = [0.166667, −0.15]: mean 0.008333, |·| mean 0.158333
    #   ppl_ratio = (e^0.166667 + e^−0.15)/2 = 1.021034
    #   chi2_token = (e^1 + 1 + e^−2 + 1 + e^0.6)/5 − 1 = 0.335147
    #   chi2_seq = (e^−1 + e^0.6)/2 − 1 = 0.094999
    #   corrected = token k2 ≤ 0.1 = [[F, T, F], [T, T, F]]: 2 of 5 tokens, 1 of 2 rows rejected
    kept = token_rejection_mask(OLD, ROLLOUT, MASK, estimator=mismatch_k2, max_value=0.1)
    m = rollout_correction_metrics(OLD, ROLLOUT, MASK, kept)
    lo, lr = [-3.5 / 3, -0.2], [-1.0, -0.35]
    diff = [lr[0] - lo[0], lr[1] - lo[1]]
    expected = {
        "kl": 0.04,
        "k3_kl": (E(0.5) - 1.5 + E(-1.0) + E(0.3) - 1.3) / 5,
        "training_log_ppl": -(lo[0] + lo[1]) / 2,
        "training_ppl": (E(-lo[0]) + E(-lo[1])) / 2,
        "rollout_log_ppl": 0.675,
        "rollout_ppl": (E(1.0) + E(0.35)) / 2,
        "log_ppl_diff": (diff[0] + diff[1]) / 2,
        "log_ppl_abs_diff": (abs(diff[0]) + abs(diff[1])) / 2,
        "log_ppl_diff_max": diff[0],
        "log_ppl_diff_min": diff[1],
        "ppl_ratio": (E(diff[0]) + E(diff[1])) / 2,
        "chi2_token": (E(1.0) + 1 + E(-2.0) + 1 + E(0.6)) / 5 - 1,
        "chi2_seq": (E(-1.0) + E(0.6)) / 2 - 1,
        "rollout_rs_masked_fraction": 0.4,
        "rollout_rs_seq_masked_fraction": 0.5,
    }
    assert set(m) == {f"rollout_corr/{k}" for k in expected}
    for k, v in expected.items():
        assert_close(m[f"rollout_corr/{k}"], t32(v), **EXACT, msg=k)
    # Without the optional tensors only the mismatch metrics come back.
    assert set(rollout_correction_metrics(OLD, ROLLOUT, MASK)) == {
        f"rollout_corr/{k}" for k in expected if not k.startswith("rollout_rs")
    }


def test_token_is_metrics_literal():
    # Δ = {0.5, 0, −1, 0, 0.3}, C = 1.5: untruncated w = {e^.5, 1, e^−1, 1, e^.3} (verl measures before
    # truncation); clamped to [1/C, C] = [2/3, 1.5] for std and ESS: {1.5, 1, 2/3, 1, e^.3}.
    m = token_is_metrics(OLD, ROLLOUT, MASK, clip_max=1.5)
    w = [E(0.5), 1.0, E(-1.0), 1.0, E(0.3)]
    wc = [1.5, 1.0, 2.0 / 3.0, 1.0, E(0.3)]
    mc, mc2 = sum(wc) / 5, sum(x * x for x in wc) / 5
    rows = [(E(0.5) + 1.0 + E(-1.0)) / 3, (1.0 + E(0.3)) / 2]
    expected = {
        "rollout_is_mean": sum(w) / 5,
        "rollout_is_max": E(0.5),
        "rollout_is_min": E(-1.0),
        "rollout_is_ratio_fraction_high": 1 / 5,  # e^.5 > 1.5
        "rollout_is_ratio_fraction_low": 1 / 5,  # e^−1 < 2/3
        "rollout_is_std": math.sqrt(mc2 - mc * mc),
        "rollout_is_eff_sample_size": 1.0 / (sum((x / (mc + 1e-8)) ** 2 for x in wc) / 5),
        "rollout_is_seq_mean": sum(rows) / 2,
        "rollout_is_seq_std": abs(rows[0] - rows[1]) / math.sqrt(2),
        "rollout_is_seq_max": max(rows),
        "rollout_is_seq_min": min(rows),
        "rollout_is_seq_max_deviation": max(abs(r - 1) for r in rows),
        "rollout_is_seq_fraction_high": 0.0,
        "rollout_is_seq_fraction_low": 0.0,
    }
    assert set(m) == {f"rollout_corr/{k}" for k in expected}
    for k, v in expected.items():
        assert_close(m[f"rollout_corr/{k}"], t32(v), **EXACT, msg=k)


def _verl_is_metrics(old, rollout, mask, c, sequence):
    """verl's compute_rollout_correction_weights + compute_is_metrics (rollout_corr_helper.py), restated
    in torch on a mask without empty rows; the reference for both of ours."""
    maskf = mask.double()
    log_ratio = (old - rollout).double()

    def mmean(x, axis=None):
        return (x * maskf).sum() / maskf.sum() if axis is None else (x * maskf).sum(axis) / maskf.sum(axis)

    if sequence:
        stat = (log_ratio * maskf).sum(-1, keepdim=True)
        w = torch.exp(stat.clamp(-20, 20)).expand_as(log_ratio) * maskf
        m = {"rollout_is_max": torch.exp(stat.max().clamp(max=20)), "rollout_is_min": torch.exp(stat.min()),
             "rollout_is_mean": mmean(w),
             "rollout_is_ratio_fraction_high": (stat > math.log(c)).double().mean(),
             "rollout_is_ratio_fraction_low": (stat < math.log(1 / c)).double().mean()}
    else:
        w = torch.exp(log_ratio.clamp(-20, 20)) * maskf
        m = {"rollout_is_mean": mmean(w), "rollout_is_ratio_fraction_high": mmean((w > c).double()),
             "rollout_is_ratio_fraction_low": mmean((w < 1 / c).double()),
             "rollout_is_max": w.masked_fill(~mask, -INF).max(),
             "rollout_is_min": w.masked_fill(~mask, INF).min()}
    wc = w.clamp(min=1 / c, max=c)
    m["rollout_is_std"] = torch.sqrt((mmean(wc.square()) - mmean(wc).square()).clamp(min=0))
    m["rollout_is_eff_sample_size"] = 1.0 / mmean((wc / (mmean(wc) + 1e-8)).square())
    seq = mmean(w, -1)
    m.update({"rollout_is_seq_mean": seq.mean(), "rollout_is_seq_std": seq.std(),
              "rollout_is_seq_max": seq.max(),
              "rollout_is_seq_min": seq.min(), "rollout_is_seq_max_deviation": (seq - 1).abs().max(),
              "rollout_is_seq_fraction_high": (seq > c).double().mean(),
              "rollout_is_seq_fraction_low": (seq < 1 / c).double().mean()})
    return m


@pytest.mark.parametrize("sequence", [False, True], ids=["token", "sequence"])
def test_is_metrics_equal_verl(sequence):
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 3
    rollout = old + torch.randn(6, 9, generator=g, dtype=torch.float64) * (0.4 if sequence else 0.8)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    fn = sequence_is_metrics if sequence else token_is_metrics
    got = fn(old, rollout, mask, clip_max=2.0)
    ref = _verl_is_metrics(old, rollout, mask, 2.0, sequence)
    assert set(got) == {f"rollout_corr/{k}" for k in ref}
    for k, v in ref.items():
        assert_close(got[f"rollout_corr/{k}"], v, **REORDER, msg=k)
    assert 0 < float(got["rollout_corr/rollout_is_ratio_fraction_high"]) < 1  # both tails are exercised


# ----------------------------------------------------------------------------------------------------
# Identities


def test_equal_logprobs_give_unit_weights_and_no_mismatch():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g) * 4
    mask = bmask([[T_] * 5, [T_, T_, F_, F_, F_], [T_, F_, T_, F_, T_]])
    for fn in (token_is_weights, sequence_is_weights):
        w = fn(lp, lp, mask, clip_max=2.0)
        assert torch.equal(w, mask.float())
    m = rollout_correction_metrics(lp, lp, mask) | token_is_metrics(lp, lp, mask, clip_max=2.0)
    for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "log_ppl_abs_diff", "rollout_is_std"):
        assert float(m[f"rollout_corr/{k}"]) == 0.0, k
    for k in (
        "ppl_ratio",
        "rollout_is_mean",
        "rollout_is_eff_sample_size",
        "rollout_is_max",
        "rollout_is_min",
    ):
        assert float(m[f"rollout_corr/{k}"]) == 1.0, k
    assert torch.equal(m["rollout_corr/training_ppl"], m["rollout_corr/rollout_ppl"])
    for fn in REJECTIONS:
        for est in MISMATCH:
            assert torch.equal(fn(lp, lp, mask, estimator=est, max_value=0.0, min_value=0.0), mask)


def test_sequence_weight_is_product_of_token_ratios():
    # Untruncated (C large, |ΣΔ| < 20): w_seq = Π_t w_t.
    g = torch.Generator().manual_seed(1)
    old, rollout = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.7
    wt = token_is_weights(old, rollout, mask, clip_max=1e6)
    ws = sequence_is_weights(old, rollout, mask, clip_max=1e6)
    prod = torch.where(mask, wt, torch.ones(())).prod(dim=-1)
    assert_close(ws, torch.where(mask, prod.unsqueeze(-1), torch.zeros(())), **REORDER)


def test_seq_sum_k1_equals_sequence_log_ratio_bound():
    # seq_sum k1 within [−log C, log C]  <=>  sequence ratio within [1/C, C] (|ΣΔ| < 20).
    g = torch.Generator().manual_seed(2)
    old, rollout = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    mask = torch.ones(6, 5, dtype=torch.bool)
    c = 1.5
    kept = seq_sum_rejection_mask(
        old, rollout, mask, estimator=mismatch_k1, min_value=-math.log(c), max_value=math.log(c)
    )
    ratio = torch.exp((old - rollout).sum(-1))
    assert torch.equal(kept[:, 0], (ratio >= 1 / c) & (ratio <= c))


def test_normalized_weights_have_mean_one():
    g = torch.Generator().manual_seed(3)
    old, rollout = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    mask = bmask([[T_] * 6, [T_] * 2 + [F_] * 4, [F_] * 6, [T_, F_] * 3])
    wt = normalize_token_is_weights(token_is_weights(old, rollout, mask, clip_max=2.0), mask)
    assert_close(wt[mask].mean(), torch.tensor(1.0), **REORDER)
    ws = normalize_sequence_is_weights(sequence_is_weights(old, rollout, mask, clip_max=2.0), mask)
    rows = mask.any(-1)
    assert_close(ws[rows].amax(-1).mean(), torch.tensor(1.0), **REORDER)


def test_ess_is_mean_squared_over_mean_square_of_the_clamped_weights():
    # verl's 1/mean((w_c/mean w_c)²) equals mean(w_c)²/mean(w_c²), w_c = clamp(w, 1/C, C).
    g = torch.Generator().manual_seed(4)
    old, rollout = -torch.rand(3, 7, generator=g) * 2, -torch.rand(3, 7, generator=g) * 2
    mask = torch.rand(3, 7, generator=g) < 0.8
    wc = torch.exp(old - rollout)[mask].clamp(0.5, 2.0)
    m = token_is_metrics(old, rollout, mask, clip_max=2.0)
    assert_close(m["rollout_corr/rollout_is_eff_sample_size"], wc.mean() ** 2 / wc.square().mean(), **REORDER)


# ----------------------------------------------------------------------------------------------------
# Properties


def _garbage(shape):
    pattern = torch.arange(math.prod(shape)).view(shape) % 3
    return torch.where(pattern == 0, NAN, torch.where(pattern == 1, INF, -INF))


def _batch(data, *, low=-10.0, high=0.0):
    b = data.draw(st.integers(1, 4))
    t = data.draw(st.integers(1, 6))
    vals = st.floats(low, high, allow_nan=False, width=32)
    grid = st.lists(st.lists(vals, min_size=t, max_size=t), min_size=b, max_size=b)
    old, rollout = torch.tensor(data.draw(grid)), torch.tensor(data.draw(grid))
    mask = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b))
    )
    return old, rollout, mask


def _all_outputs(old, rollout, mask):
    wt = token_is_weights(old, rollout, mask, clip_max=2.0)
    ws = sequence_is_weights(old, rollout, mask, clip_max=2.0)
    out = {
        "wt": wt,
        "ws": ws,
        "nwt": normalize_token_is_weights(wt, mask),
        "nws": normalize_sequence_is_weights(ws, mask),
    }
    for fn in REJECTIONS:
        for est in MISMATCH:
            out[f"{fn.__name__}/{est.__name__}"] = fn(
                old, rollout, mask, estimator=est, min_value=-0.3, max_value=0.3
            )
    kept = token_rejection_mask(old, rollout, mask, estimator=mismatch_k3, max_value=0.5)
    out.update(rollout_correction_metrics(old, rollout, mask, kept))
    out.update({f"token/{k}": v for k, v in token_is_metrics(old, rollout, mask, clip_max=2.0).items()})
    out.update({f"seq/{k}": v for k, v in sequence_is_metrics(old, rollout, mask, clip_max=2.0).items()})
    return out


@given(st.data())
def test_masked_values_never_change_outputs(data):
    old, rollout, mask = _batch(data)
    garbage = _garbage(old.shape)
    clean = _all_outputs(old, rollout, mask)
    dirty = _all_outputs(torch.where(mask, old, garbage), torch.where(mask, rollout, -garbage), mask)
    for k, v in clean.items():
        assert torch.equal(v, dirty[k]), k


@given(st.data())
def test_extreme_mismatch_is_finite(data):
    # Δ = ±1e4 (one side of the pair at −1e4); every output finite, weights within [0, C].
    old, rollout, mask = _batch(data)
    signs = torch.tensor(data.draw(st.lists(st.booleans(), min_size=old.numel(), max_size=old.numel()))).view(
        old.shape
    )
    old = torch.where(signs, torch.zeros(()), torch.full((), -1e4))
    rollout = torch.where(signs, torch.full((), -1e4), torch.zeros(()))
    out = _all_outputs(old, rollout, mask)
    for k, v in out.items():
        if v.is_floating_point():
            assert bool(torch.isfinite(v).all()), k
    assert bool((out["wt"] <= 2.0).all()) and bool((out["wt"] >= 0).all())
    assert bool((out["ws"] <= 2.0).all()) and bool((out["ws"] >= 0).all())


@given(st.data())
def test_weights_are_truncated_ratios_and_rejection_only_removes(data):
    old, rollout, mask = _batch(data)
    c = data.draw(st.floats(0.5, 5.0))
    wt = token_is_weights(old, rollout, mask, clip_max=c)
    ratio = torch.exp((old - rollout).clamp(-20, 20))
    assert torch.equal(wt, torch.where(mask, ratio.clamp(max=c), torch.zeros(())))
    for fn in REJECTIONS:
        kept = fn(old, rollout, mask, estimator=mismatch_k3, max_value=data.draw(st.floats(0.0, 2.0)))
        assert not bool((kept & ~mask).any())
        if fn is not token_rejection_mask:  # sequence criteria keep or drop whole rows
            assert torch.equal(kept, mask & kept.any(-1, keepdim=True))


@given(st.data())
def test_ess_in_unit_interval(data):
    old, rollout, mask = _batch(data)
    for fn in (token_is_metrics, sequence_is_metrics):
        ess = float(fn(old, rollout, mask, clip_max=3.0)["rollout_corr/rollout_is_eff_sample_size"])
        assert 0.0 <= ess <= 1.0 + 1e-6


def test_all_masked_and_empty_rows():
    old, rollout = t32([[NAN, 1.0], [-2.0, INF]]), t32([[0.0, -INF], [NAN, -1.0]])
    none = torch.zeros(2, 2, dtype=torch.bool)
    out = _all_outputs(old, rollout, none)
    for k, v in out.items():
        if v.dtype == torch.bool:
            assert not bool(v.any()), k
        else:
            assert bool((v == 0).all()), k
    # One empty row among valid ones: it is ignored by the per-row statistics.
    mask = bmask([[T_, T_], [F_, F_]])
    old2, rollout2 = t32([[-1.0, -1.0], [NAN, NAN]]), t32([[-1.0, -1.0], [INF, 0.0]])
    m = rollout_correction_metrics(old2, rollout2, mask)
    m |= token_is_metrics(old2, rollout2, mask, clip_max=2.0)
    assert float(m["rollout_corr/training_ppl"]) == pytest.approx(math.e, rel=1e-6)
    assert float(m["rollout_corr/chi2_seq"]) == 0.0
    assert float(m["rollout_corr/rollout_is_eff_sample_size"]) == 1.0


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input():
    o, r, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    for fn in (token_is_weights, sequence_is_weights):
        with pytest.raises(ValueError, match="rollout_logprobs"):
            fn(o, torch.zeros(2, 4), m, clip_max=2.0)
        with pytest.raises(ValueError, match="response_mask"):
            fn(o, r, m.float(), clip_max=2.0)
        with pytest.raises(ValueError, match="clip_max"):
            fn(o, r, m, clip_max=0.0)
        with pytest.raises(ValueError, match="old_logprobs"):
            fn(t32([[NAN, 0.0, 0.0], [0.0, 0.0, 0.0]]), r, m, clip_max=2.0)
        with pytest.raises(ValueError, match="old_logprobs"):
            fn(torch.zeros(6), torch.zeros(6), torch.ones(6, dtype=torch.bool), clip_max=2.0)
    for fn in REJECTIONS:
        with pytest.raises(ValueError, match="estimator"):
            fn(o, r, m, estimator="k3", max_value=1.0)
        with pytest.raises(ValueError, match="estimator"):
            fn(o, r, m, estimator=lambda a, b: a[:, :1], max_value=1.0)
        with pytest.raises(ValueError, match="min_value"):
            fn(o, r, m, estimator=mismatch_k1, min_value=1.0, max_value=0.0)
        with pytest.raises(ValueError, match="max_value"):
            fn(o, r, m, estimator=mismatch_k1, max_value=INF)
        with pytest.raises(ValueError, match="rollout_logprobs"):
            fn(o, t32([[0.0, INF, 0.0], [0.0, 0.0, 0.0]]), m, estimator=mismatch_k1, max_value=1.0)
    with pytest.raises(ValueError, match="is_weights"):
        normalize_token_is_weights(torch.zeros(2, 3, dtype=torch.long), m)
    with pytest.raises(ValueError, match="response_mask"):
        normalize_sequence_is_weights(torch.zeros(2, 3), m[:1])
    with pytest.raises(ValueError, match="corrected_mask"):
        rollout_correction_metrics(o, r, bmask([[T_, F_, T_], [T_, T_, T_]]), m)
    for fn in (token_is_metrics, sequence_is_metrics):
        with pytest.raises(ValueError, match="clip_max"):
            fn(o, r, m, clip_max=0.0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        mismatch_k3(o, torch.zeros(3, 2))

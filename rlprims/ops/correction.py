"""Rollout correction: the trainer's log-probs versus the inference engine's.

The engine (vLLM, bf16 kernels, different batching) samples from π_rollout, which is not exactly the
trainer's π_old even with the same weights. With Δ = log π_old − log π_rollout per token (or
log π − log π_rollout when the old-policy forward is skipped: pass the current log-probs as
`old_logprobs`), this module gives

  * truncated importance weights (TIS), token level or sequence level, detached, optionally normalized
    to batch mean 1 by a separate call;
  * rejection masks: tokens or whole sequences whose mismatch divergence is out of bounds leave the
    response mask; the divergence is a per-token estimator passed as a function (`mismatch_k1/k2/k3`
    or your own);
  * the diagnostics, under verl's `rollout_corr/...` names.

Follows verl's `rollout_corr_helper.py` (exp(±20) safety clamp, truncation C = 2.0 by default there,
detach before normalization). References: Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training" (https://fengyao.notion.site/off-policy-rl); "When speed
kills stability: demystifying RL collapse from the training-inference mismatch"
(https://richardli.xyz/rl-collapse).

Combining criteria: compute each rejection mask from the *original* response mask and AND them
(`m = token_rejection_mask(...) & seq_mean_rejection_mask(...)`), as verl does; feeding one output into
the next would change the sequence statistics of the second.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from rlprims.ops._validate import check_finite, check_mask, check_positive, check_same_shape, check_tensor
from rlprims.ops.reduce import masked_mean, masked_sum

__all__ = [
    "mismatch_k1",
    "mismatch_k2",
    "mismatch_k3",
    "token_is_weights",
    "sequence_is_weights",
    "normalize_token_is_weights",
    "normalize_sequence_is_weights",
    "token_rejection_mask",
    "seq_sum_rejection_mask",
    "seq_mean_rejection_mask",
    "seq_max_rejection_mask",
    "rollout_correction_metrics",
    "token_is_metrics",
    "sequence_is_metrics",
]

# verl's SAFETY_BOUND: log-ratios are clamped to ±20 before exp (e^20 ≈ 4.85e8).
_SAFETY = 20.0

Estimator = Callable[[Tensor, Tensor], Tensor]


def _check_pair(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> None:
    check_tensor("old_logprobs", old_logprobs, ndim=2)
    check_same_shape(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    check_mask("response_mask", response_mask, old_logprobs.shape)
    check_finite("old_logprobs", old_logprobs, response_mask)
    check_finite("rollout_logprobs", rollout_logprobs, response_mask)


def _safe_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    return (old_logprobs - rollout_logprobs).clamp(-_SAFETY, _SAFETY)


# ---------------------------------------------------------------------------------------------------
# Per-token mismatch divergences (estimators of KL(π_rollout ‖ π_old) from tokens sampled by the engine).


def mismatch_k1(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    """k1 = −Δ = log π_rollout − log π_old,  Δ clamped to ±20 first (verl's `token_k1`).

    Can be negative; bound it on both sides. verl's k1 threshold "a_b" (ratio bounds) is
    min_value = log a, max_value = log b; a single threshold C means a = 1/C, b = C.
    Shapes: [B, T], [B, T] -> [B, T].
    """
    check_same_shape(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    return -_safe_log_ratio(old_logprobs, rollout_logprobs)


def mismatch_k2(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    """k2 = ½ Δ²,  Δ = log π_old − log π_rollout clamped to ±20 (verl's `token_k2`). Always ≥ 0.

    Shapes: [B, T], [B, T] -> [B, T].
    """
    check_same_shape(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    return 0.5 * _safe_log_ratio(old_logprobs, rollout_logprobs).square()


def mismatch_k3(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    """k3 = e^Δ − 1 − Δ,  Δ = log π_old − log π_rollout clamped to ±20 (verl's `token_k3`). Always ≥ 0.

    Unbiased for KL(π_rollout ‖ π_old) under the engine's samples. Unlike `kl.kl_k3` there is no clamp
    of the value at 10 (verl's rejection does not clamp it); it is at most e^20 ≈ 4.85e8.
    Shapes: [B, T], [B, T] -> [B, T].
    """
    check_same_shape(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    d = _safe_log_ratio(old_logprobs, rollout_logprobs)
    return torch.exp(d) - 1.0 - d


# ---------------------------------------------------------------------------------------------------
# Truncated importance weights.


def token_is_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, *, clip_max: float
) -> Tensor:
    """Per-token truncated importance weights:  w_t = min(exp(clamp(Δ_t, ±20)), C), detached.

    Δ_t = log π_old − log π_rollout. Positions under a False mask are 0 (as verl). verl's default
    C (`rollout_is_threshold`) is 2.0. Multiply the per-token policy loss by w.
    Yao et al. 2025 (truncated IS for the rollout/trainer mismatch),
    https://fengyao.notion.site/off-policy-rl.
    Shapes: old_logprobs [B, T], rollout_logprobs [B, T], response_mask [B, T] bool -> [B, T].
    """
    _check_pair(old_logprobs, rollout_logprobs, response_mask)
    c = check_positive("clip_max", clip_max)
    with torch.no_grad():
        w = torch.exp(_safe_log_ratio(old_logprobs.detach(), rollout_logprobs.detach())).clamp(max=c)
        return torch.where(response_mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def sequence_is_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, *, clip_max: float
) -> Tensor:
    """Per-sequence truncated importance weights:  w_i = min(exp(clamp(Σ_t m_it Δ_it, ±20)), C), detached.

    The weight of sequence i is broadcast over its valid tokens; positions under a False mask are 0 (as
    verl). A row with no valid token is all 0. verl's default C is 2.0.
    Shapes: old_logprobs [B, T], rollout_logprobs [B, T], response_mask [B, T] bool -> [B, T].
    """
    _check_pair(old_logprobs, rollout_logprobs, response_mask)
    c = check_positive("clip_max", clip_max)
    with torch.no_grad():
        log_ratio_sum = masked_sum(old_logprobs.detach() - rollout_logprobs.detach(), response_mask, dim=-1)
        w = torch.exp(log_ratio_sum.clamp(-_SAFETY, _SAFETY)).clamp(max=c)
        w = w.unsqueeze(-1).expand_as(old_logprobs)
        return torch.where(response_mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _check_weights(is_weights: Tensor, response_mask: Tensor) -> None:
    check_tensor("is_weights", is_weights, ndim=2, floating=True)
    check_mask("response_mask", response_mask, is_weights.shape)
    check_finite("is_weights", is_weights, response_mask)


def normalize_token_is_weights(is_weights: Tensor, response_mask: Tensor) -> Tensor:
    """Token weights rescaled to mean 1 over the valid tokens:  w'_t = w_t / (Σ m w / Σ m).

    verl's `rollout_is_batch_normalize` for token-level weights. A mean ≤ 1e-8 (all weights zero, or no
    valid token) leaves the weights unchanged, as verl. The mean is over the tensor you pass: call it on
    the whole batch before splitting into micro-batches (under data parallelism verl all-reduces the
    mean; gather the batch or normalize before sharding to match). Log the metrics of the weights
    *before* this call, as verl does. Output detached, 0 under a False mask.
    Shapes: is_weights [B, T], response_mask [B, T] bool -> [B, T].
    """
    _check_weights(is_weights, response_mask)
    with torch.no_grad():
        mean = masked_mean(is_weights.detach(), response_mask)
        scale = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        zero = torch.zeros((), dtype=is_weights.dtype, device=is_weights.device)
        return torch.where(response_mask, is_weights.detach() / scale, zero)


def normalize_sequence_is_weights(is_weights: Tensor, response_mask: Tensor) -> Tensor:
    """Sequence weights rescaled to mean 1 over the sequences:  w'_i = w_i / mean_{i: |o_i|>0} w_i.

    w_i is the mean of row i's weights over its valid tokens (for `sequence_is_weights` output, the
    sequence weight itself); rows with no valid token are not counted. verl's
    `rollout_is_batch_normalize` for sequence-level weights; a mean ≤ 1e-8 leaves the weights unchanged.
    Same batch caveat as `normalize_token_is_weights`. Output detached, 0 under a False mask.
    Shapes: is_weights [B, T], response_mask [B, T] bool -> [B, T].
    """
    _check_weights(is_weights, response_mask)
    with torch.no_grad():
        seq_w = masked_mean(is_weights.detach(), response_mask, dim=-1)
        mean = masked_mean(seq_w, response_mask.any(dim=-1))
        scale = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        zero = torch.zeros((), dtype=is_weights.dtype, device=is_weights.device)
        return torch.where(response_mask, is_weights.detach() / scale, zero)


# ---------------------------------------------------------------------------------------------------
# Rejection masks.


def _check_rejection(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    estimator: object,
    max_value: object,
    min_value: object,
) -> Tensor:
    _check_pair(old_logprobs, rollout_logprobs, response_mask)
    if not callable(estimator):
        raise ValueError(
            f"estimator must be a function (old_logprobs, rollout_logprobs) -> [B, T], such as "
            f"mismatch_k3, got {estimator!r}"
        )
    for name, v in (("max_value", max_value), ("min_value", min_value)):
        if v is None and name == "min_value":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if min_value is not None and min_value > max_value:  # type: ignore[operator]
        raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
    with torch.no_grad():
        stat = estimator(old_logprobs.detach(), rollout_logprobs.detach())
    if not isinstance(stat, Tensor) or stat.shape != old_logprobs.shape:
        got = tuple(stat.shape) if isinstance(stat, Tensor) else type(stat).__name__
        raise ValueError(f"estimator must return a tensor of shape {tuple(old_logprobs.shape)}, got {got}")
    return stat


def _in_bounds(stat: Tensor, max_value: float, min_value: float | None) -> Tensor:
    keep = stat <= max_value
    if min_value is not None:
        keep = keep & (stat >= min_value)
    return keep


def token_rejection_mask(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    estimator: Estimator,
    max_value: float,
    min_value: float | None = None,
) -> Tensor:
    """Response mask without the tokens whose mismatch divergence is out of bounds.

    keep_t = m_t ∧ (min ≤ d_t ≤ max),  d = estimator(old_logprobs, rollout_logprobs), e.g. `mismatch_k3`.
    verl's `rollout_rs="token_k1|k2|k3"`. k2/k3 are ≥ 0 and take only `max_value`; for k1 see
    `mismatch_k1` for verl's two-sided ratio bounds.
    Shapes: old_logprobs [B, T], rollout_logprobs [B, T], response_mask [B, T] bool -> [B, T] bool.
    """
    stat = _check_rejection(old_logprobs, rollout_logprobs, response_mask, estimator, max_value, min_value)
    return response_mask & _in_bounds(stat, max_value, min_value)


def seq_sum_rejection_mask(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    estimator: Estimator,
    max_value: float,
    min_value: float | None = None,
) -> Tensor:
    """Response mask without the sequences whose summed mismatch divergence is out of bounds.

    keep_it = m_it ∧ (min ≤ Σ_t m_it d_it ≤ max)  (verl's `rollout_rs="seq_sum_k*"`). With `mismatch_k1`
    the sum is the sequence log-ratio log π_rollout(o) − log π_old(o).
    Shapes: old_logprobs [B, T], rollout_logprobs [B, T], response_mask [B, T] bool -> [B, T] bool.
    """
    stat = _check_rejection(old_logprobs, rollout_logprobs, response_mask, estimator, max_value, min_value)
    seq = masked_sum(stat, response_mask, dim=-1)
    return response_mask & _in_bounds(seq, max_value, min_value).unsqueeze(-1)


def seq_mean_rejection_mask(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    estimator: Estimator,
    max_value: float,
    min_value: float | None = None,
) -> Tensor:
    """Response mask without the sequences whose mean mismatch divergence is out of bounds.

    keep_it = m_it ∧ (min ≤ Σ_t m_it d_it / Σ_t m_it ≤ max)  (verl's `rollout_rs="seq_mean_k*"`;
    with `mismatch_k1` this is the geometric-mean ratio in log space).
    Shapes: old_logprobs [B, T], rollout_logprobs [B, T], response_mask [B, T] bool -> [B, T] bool.
    """
    stat = _check_rejection(old_logprobs, rollout_logprobs, response_mask, estimator, max_value, min_value)
    seq = masked_mean(stat, response_mask, dim=-1)
    return response_mask & _in_bounds(seq, max_value, min_value).unsqueeze(-1)


def seq_max_rejection_mask(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    estimator: Estimator,
    max_value: float,
    min_value: float | None = None,
) -> Tensor:
    """Response mask without the sequences whose largest token divergence is out of bounds.

    keep_it = m_it ∧ (min ≤ max_{t: m_it} d_it ≤ max)  (verl's `rollout_rs="seq_max_k2|k3"`). A row with
    no valid token has statistic 0 (as verl) and stays empty.
    Shapes: old_logprobs [B, T], rollout_logprobs [B, T], response_mask [B, T] bool -> [B, T] bool.
    """
    stat = _check_rejection(old_logprobs, rollout_logprobs, response_mask, estimator, max_value, min_value)
    neg_inf = torch.full((), float("-inf"), dtype=stat.dtype, device=stat.device)
    seq = torch.where(response_mask, stat, neg_inf).amax(dim=-1)
    seq = torch.where(response_mask.any(dim=-1), seq, torch.zeros_like(seq))
    return response_mask & _in_bounds(seq, max_value, min_value).unsqueeze(-1)


# ---------------------------------------------------------------------------------------------------
# Diagnostics.


def _row_mean(values: Tensor, rows: Tensor) -> Tensor:
    return masked_mean(values, rows)


def _row_extreme(values: Tensor, rows: Tensor, *, largest: bool) -> Tensor:
    fill = torch.full(
        (), float("-inf") if largest else float("inf"), dtype=values.dtype, device=values.device
    )
    picked = torch.where(rows, values, fill)
    out = picked.amax() if largest else picked.amin()
    return torch.where(rows.any(), out, torch.zeros_like(out))


def rollout_correction_metrics(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    corrected_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Mismatch diagnostics under verl's names (detached 0-dim tensors), over the original response mask.

    With Δ = log π_old − log π_rollout, ℓ_i = masked token-mean of log π_old on row i (ℓ^r_i for the
    rollout), means "over rows" taken over the rows with at least one valid token:
      rollout_corr/kl                 masked mean of −Δ          (k1 of KL(π_rollout ‖ π_old))
      rollout_corr/k3_kl              masked mean of e^Δ − Δ − 1 (k3), Δ clamped to ±20
      rollout_corr/training_log_ppl   mean over rows of −ℓ_i;  rollout_corr/rollout_log_ppl likewise
      rollout_corr/training_ppl       mean over rows of exp(−ℓ_i);  rollout_corr/rollout_ppl likewise
      rollout_corr/log_ppl_diff       mean over rows of ℓ^r_i − ℓ_i  (+ _abs_diff, _diff_max, _diff_min)
      rollout_corr/ppl_ratio          mean over rows of exp(ℓ^r_i − ℓ_i)
      rollout_corr/chi2_token         masked mean of e^(2Δ) − 1, Δ clamped to ±20
      rollout_corr/chi2_seq           mean over rows of e^(2 Σ_t Δ) − 1, the sum clamped to ±20
    with `corrected_mask` (the response mask after rejection):
      rollout_corr/rollout_rs_masked_fraction          rejected valid tokens / valid tokens
      rollout_corr/rollout_rs_seq_masked_fraction      rows with a rejected token / rows
    Every metric is 0 when no token is valid. The importance-weight metrics are `token_is_metrics` /
    `sequence_is_metrics` (they need the truncation C).
    Differs from verl: rows with no valid token are skipped in the means over rows (verl counts them,
    and raises on an all-empty mask); k3_kl clamps Δ to ±20 (verl does not, and overflows beyond ~88);
    the perplexities clamp their exponent at 20 so a degenerate row reports e^20 rather than inf (the
    *_log_ppl metrics are exact).
    Shapes: old_logprobs, rollout_logprobs [B, T]; response_mask, corrected_mask [B, T] bool.
    """
    _check_pair(old_logprobs, rollout_logprobs, response_mask)
    mask = response_mask
    with torch.no_grad():
        old = old_logprobs.detach()
        rollout = rollout_logprobs.detach()
        rows = mask.any(dim=-1)
        d = old - rollout
        d_safe = d.clamp(-_SAFETY, _SAFETY)

        m: dict[str, Tensor] = {}
        m["kl"] = masked_mean(-d, mask)
        m["k3_kl"] = masked_mean(torch.exp(d_safe) - d_safe - 1.0, mask)

        ell_old = masked_mean(old, mask, dim=-1)
        ell_rollout = masked_mean(rollout, mask, dim=-1)
        m["training_ppl"] = _row_mean(torch.exp((-ell_old).clamp(max=_SAFETY)), rows)
        m["training_log_ppl"] = _row_mean(-ell_old, rows)
        m["rollout_ppl"] = _row_mean(torch.exp((-ell_rollout).clamp(max=_SAFETY)), rows)
        m["rollout_log_ppl"] = _row_mean(-ell_rollout, rows)
        log_ppl_diff = ell_rollout - ell_old
        m["log_ppl_diff"] = _row_mean(log_ppl_diff, rows)
        m["log_ppl_abs_diff"] = _row_mean(log_ppl_diff.abs(), rows)
        m["log_ppl_diff_max"] = _row_extreme(log_ppl_diff, rows, largest=True)
        m["log_ppl_diff_min"] = _row_extreme(log_ppl_diff, rows, largest=False)
        m["ppl_ratio"] = _row_mean(torch.exp(log_ppl_diff.clamp(-_SAFETY, _SAFETY)), rows)

        m["chi2_token"] = masked_mean(torch.exp(2.0 * d_safe), mask) - 1.0
        seq_log_ratio = masked_sum(d, mask, dim=-1).clamp(-_SAFETY, _SAFETY)
        m["chi2_seq"] = _row_mean(torch.exp(2.0 * seq_log_ratio), rows) - 1.0

        if corrected_mask is not None:
            check_mask("corrected_mask", corrected_mask, mask.shape)
            if bool((corrected_mask & ~mask).any()):
                raise ValueError(
                    "corrected_mask must be a subset of response_mask (rejection only removes tokens), "
                    f"shape {tuple(corrected_mask.shape)}"
                )
            rejected = mask & ~corrected_mask
            m["rollout_rs_masked_fraction"] = masked_mean(rejected.to(old.dtype), mask)
            m["rollout_rs_seq_masked_fraction"] = _row_mean(rejected.any(dim=-1).to(old.dtype), rows)

        valid = mask.any()
        return {f"rollout_corr/{k}": torch.where(valid, v, torch.zeros_like(v)) for k, v in m.items()}


def _is_weight_metrics(
    w: Tensor, mask: Tensor, rows: Tensor, *, clip_max: float, stat_max: Tensor, stat_min: Tensor,
    frac_high: Tensor, frac_low: Tensor,
) -> dict[str, Tensor]:
    """verl's `compute_is_metrics` body on untruncated weights w [B, T] (0 under the mask)."""
    c_low = 1.0 / clip_max
    m: dict[str, Tensor] = {}
    m["rollout_is_mean"] = masked_mean(w, mask)
    m["rollout_is_max"] = stat_max
    m["rollout_is_min"] = stat_min
    m["rollout_is_ratio_fraction_high"] = frac_high
    m["rollout_is_ratio_fraction_low"] = frac_low
    wc = w.clamp(min=c_low, max=clip_max)  # verl: std and ESS on weights clamped to [1/C, C]
    mean_c = masked_mean(wc, mask)
    var_c = (masked_mean(wc.square(), mask) - mean_c.square()).clamp(min=0.0)
    m["rollout_is_std"] = torch.where(mask.sum() > 1, var_c.sqrt(), torch.zeros_like(var_c))
    ess_denominator = masked_mean((wc / (mean_c + 1e-8)).square(), mask)
    m["rollout_is_eff_sample_size"] = 1.0 / ess_denominator.clamp(min=1e-30)
    seq = masked_mean(w, mask, dim=-1)  # [B]: each row's mean weight
    m["rollout_is_seq_mean"] = _row_mean(seq, rows)
    n_rows = rows.sum()
    seq_dev2 = masked_sum((seq - m["rollout_is_seq_mean"]).square(), rows)
    m["rollout_is_seq_std"] = torch.where(n_rows > 1, (seq_dev2 / (n_rows - 1).clamp(min=1)).sqrt(), 0.0)
    m["rollout_is_seq_max"] = _row_extreme(seq, rows, largest=True)
    m["rollout_is_seq_min"] = _row_extreme(seq, rows, largest=False)
    m["rollout_is_seq_max_deviation"] = _row_extreme((seq - 1.0).abs(), rows, largest=True)
    m["rollout_is_seq_fraction_high"] = _row_mean((seq > clip_max).to(w.dtype), rows)
    m["rollout_is_seq_fraction_low"] = _row_mean((seq < c_low).to(w.dtype), rows)
    valid = mask.any()
    return {f"rollout_corr/{k}": torch.where(valid, v, torch.zeros_like(v)) for k, v in m.items()}


def token_is_metrics(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, *, clip_max: float
) -> dict[str, Tensor]:
    """verl's metrics of token-level importance weights (`rollout_is="token"`), as detached 0-dim tensors.

    w_t = exp(clamp(Δ_t, ±20)), Δ = log π_old − log π_rollout, *before* truncation at C = clip_max (as
    verl measures them); over the valid tokens:
      rollout_corr/rollout_is_mean, _max, _min            masked mean / max / min of w
      rollout_corr/rollout_is_ratio_fraction_high, _low    fraction of tokens with w > C, w < 1/C
      rollout_corr/rollout_is_std                         std of clamp(w, 1/C, C) (0 for < 2 tokens)
      rollout_corr/rollout_is_eff_sample_size             1 / mean((w_c / (mean w_c + 1e-8))²),
                                                          w_c = clamp(w, 1/C, C): in (0, 1]
      rollout_corr/rollout_is_seq_mean, _std, _max, _min  of each row's mean weight (std unbiased)
      rollout_corr/rollout_is_seq_max_deviation           max over rows of |row mean − 1|
      rollout_corr/rollout_is_seq_fraction_high, _low     fraction of rows with mean weight > C, < 1/C
    Everything 0 when no token is valid.
    Differs from verl: rows with no valid token are left out of the per-row statistics (verl counts
    them as weight 0, and raises on an all-empty mask).
    Shapes: old_logprobs, rollout_logprobs [B, T] float; response_mask [B, T] bool.
    """
    _check_pair(old_logprobs, rollout_logprobs, response_mask)
    c = check_positive("clip_max", clip_max)
    mask = response_mask
    with torch.no_grad():
        log_ratio = _safe_log_ratio(old_logprobs.detach(), rollout_logprobs.detach())
        w = torch.where(mask, torch.exp(log_ratio), 0.0)
        return _is_weight_metrics(
            w, mask, mask.any(dim=-1), clip_max=c,
            stat_max=_row_extreme(w, mask, largest=True), stat_min=_row_extreme(w, mask, largest=False),
            frac_high=masked_mean((w > c).to(w.dtype), mask),
            frac_low=masked_mean((w < 1.0 / c).to(w.dtype), mask),
        )


def sequence_is_metrics(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, *, clip_max: float
) -> dict[str, Tensor]:
    """verl's metrics of sequence-level importance weights (`rollout_is="sequence"`), detached 0-dim tensors.

    w_i = exp(clamp(S_i, ±20)), S_i = Σ_t m_it Δ_it, broadcast over the row's valid tokens, before
    truncation at C = clip_max. The names of `token_is_metrics`, with verl's sequence-level definitions:
    rollout_is_max = exp(min(max_i S_i, 20)), rollout_is_min = exp(min_i S_i) (from the unclamped sums),
    rollout_is_ratio_fraction_high / _low = fraction of rows with S_i > log C / S_i < −log C; the mean,
    std and ESS are over tokens (each row's weight counted once per valid token), std and ESS on
    clamp(w, 1/C, C), as verl.
    Differs from verl: rows with no valid token are left out (verl counts them with S = 0); the exponent
    of rollout_is_min is clamped at 20 like that of the max (verl's is not: inf when every S_i > 88).
    Shapes: old_logprobs, rollout_logprobs [B, T] float; response_mask [B, T] bool.
    """
    _check_pair(old_logprobs, rollout_logprobs, response_mask)
    c = check_positive("clip_max", clip_max)
    mask = response_mask
    with torch.no_grad():
        rows = mask.any(dim=-1)
        s = masked_sum(old_logprobs.detach() - rollout_logprobs.detach(), mask, dim=-1)  # [B]
        w = torch.where(mask, torch.exp(s.clamp(-_SAFETY, _SAFETY))[:, None], 0.0)
        log_c = math.log(c)
        return _is_weight_metrics(
            w, mask, rows, clip_max=c,
            stat_max=torch.exp(_row_extreme(s, rows, largest=True).clamp(max=_SAFETY)),
            stat_min=torch.exp(_row_extreme(s, rows, largest=False).clamp(max=_SAFETY)),
            frac_high=_row_mean((s > log_c).to(w.dtype), rows),
            frac_low=_row_mean((s < -log_c).to(w.dtype), rows),
        )

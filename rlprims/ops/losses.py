"""Per-token policy losses, the value loss and the entropy of a categorical distribution.

Every policy loss takes `logprobs, old_logprobs, advantages, response_mask`, all `[B, T]` (already
shifted: `logprobs[b, t]` is the log-prob of `tokens[b, t]`), and returns `LossOutput(loss, metrics)`:

- `loss` `[B, T]`: the per-token loss to *minimize*; exactly 0 where `response_mask` is False.
- `metrics`: detached scalar diagnostics, masked means over the valid tokens, named as verl names them
  (`pg_clipfrac`, `pg_clipfrac_lower`, `ppo_kl`; `vf_clipfrac` for the value loss), in float32.

Reduction is a separate call (`rlprims.ops.reduce.aggregate_*`) whose normalizer is the total over the
optimizer step. Each docstring says which aggregation reproduces verl.

Conventions shared by all losses:
- Δ = logprobs − old_logprobs, ρ = exp(clamp(Δ, −20, 20)) (verl's overflow guard), unless stated.
- `old_logprobs`, `advantages` (and `old_values`, `returns`, importance weights) are constants: they are
  detached here, so the gradient flows only through `logprobs` (`values` for the value loss).
- Positions under a False mask are replaced by 0 before any arithmetic (`torch.where`, never a product
  with the mask), so NaN/inf in padding changes neither the loss, the metrics nor the gradient (which
  is exactly 0 there). An all-masked row gives loss 0; an all-masked batch gives metrics 0.
- Non-finite values at *valid* positions are not checked (that would cost a device sync per call);
  they propagate into the loss, where they are visible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlprims.ops._validate import check_mask, check_same_shape, check_tensor
from rlprims.ops.reduce import masked_mean

__all__ = [
    "LossOutput",
    "ppo_clip_loss",
    "gspo_loss",
    "cispo_loss",
    "sapo_loss",
    "gmpo_loss",
    "clip_cov_loss",
    "kl_cov_loss",
    "reinforce_loss",
    "value_loss",
    "entropy_from_logits",
]

_LOG_RATIO_CLAMP = 20.0  # verl: Δ clamped to [-20, 20] before exp
_GSPO_LOG_RATIO_MAX = 10.0  # verl: GSPO's token log-ratio clamped to <= 10


class LossOutput(NamedTuple):
    """A per-token loss and its diagnostics."""

    loss: Tensor  # [B, T], 0 under a False mask
    metrics: dict[str, Tensor]  # detached float32 scalars, verl's names


# ----------------------------------------------------------------------------------------- checks


def _number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in [low, high] (an end is open where *_open is set)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _check_tokens(mask_name: str, mask: Tensor, **tensors: Tensor) -> None:
    """Token tensors: floating [B, T], one shape; the mask bool of that shape."""
    first_name, first = next(iter(tensors.items()))
    check_tensor(first_name, first, ndim=2, floating=True)
    shape = check_same_shape(**tensors)
    check_mask(mask_name, mask, shape)


def _check_clip(clip_low: object, clip_high: object) -> tuple[float, float]:
    # 1 - clip_low is the lowest ratio kept; it must stay >= 0 to mean anything.
    return _number("clip_low", clip_low, low=0.0, high=1.0), _number("clip_high", clip_high, low=0.0)


def _zero_where_masked(t: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _metric(values: Tensor, mask: Tensor) -> Tensor:
    """Masked mean in float32, detached (0 for an empty mask)."""
    return masked_mean(values.detach().float(), mask)


def _fraction(flags: Tensor, mask: Tensor) -> Tensor:
    return _metric(flags.float(), mask)


def _zero_metric(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def _policy_inputs(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated inputs with padding replaced by 0; old_logprobs and advantages detached."""
    _check_tokens(
        "response_mask", response_mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages
    )
    m = response_mask
    return (
        _zero_where_masked(logprobs, m),
        _zero_where_masked(old_logprobs.detach(), m),
        _zero_where_masked(advantages.detach(), m),
    )


# ---------------------------------------------------------------------------------------- losses


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_dual: float | None = None,
) -> LossOutput:
    """Per-token clipped surrogate loss (negated, to minimize), with optional dual clip.

        L = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)),   ρ = exp(clamp(Δ, −20, 20))
        dual clip (A < 0 only):  L = min(L, −A·clip_dual)

    Metrics (masked means): `pg_clipfrac` = frac[−A·clip(ρ) > −A·ρ]; `pg_clipfrac_lower` =
    frac[A < 0 and L > −A·clip_dual] (0 without dual clip); `ppo_kl` = mean(−clamp(Δ, −20, 20)).
    verl's "vanilla" loss; it aggregates with `loss_agg_mode` (default token-mean:
    `aggregate_token_mean`). verl defaults: clip_low = clip_high = 0.2, clip_dual = 3.0.

    Schulman et al. 2017, arXiv:1707.06347; asymmetric clip ("clip-higher"): DAPO, arXiv:2503.14476;
    dual clip: Ye et al. 2020, arXiv:1912.09729.
    Differs from verl: verl always applies the dual clip (clip_ratio_c = 3.0); here it is applied only
    when `clip_dual` is given. Pass `clip_dual=3.0` for verl's numbers.
    Shapes: logprobs, old_logprobs, advantages [B, T] float; response_mask [B, T] bool -> loss [B, T].
    """
    clip_low, clip_high = _check_clip(clip_low, clip_high)
    if clip_dual is not None:
        clip_dual = _number("clip_dual", clip_dual, low=1.0, low_open=True)
    m = response_mask
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, m)

    log_ratio = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    metrics = {"pg_clipfrac": _fraction(loss_clipped > loss_unclipped, m)}
    if clip_dual is not None:
        loss_dual = -adv * clip_dual
        negative = adv < 0
        metrics["pg_clipfrac_lower"] = _fraction(negative & (loss > loss_dual), m)
        loss = torch.where(negative, torch.minimum(loss, loss_dual), loss)
    else:
        metrics["pg_clipfrac_lower"] = _zero_metric(lp)
    metrics["ppo_kl"] = _metric(-log_ratio, m)
    return LossOutput(_zero_where_masked(loss, m), metrics)


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> LossOutput:
    """Group Sequence Policy Optimization: PPO clip on a sequence-level ratio (GSPO-token form).

        log s_i = Σ_t m_it Δ_it / Σ_t m_it                          (geometric mean of token ratios)
        s_it    = exp(min(sg(log s_i) + log π_it − sg(log π_it), 10))  (value s_i, gradient s_i ∇log π_it)
        L_it    = max(−A_it·s_it, −A_it·clip(s_it, 1 − clip_low, 1 + clip_high))

    Aggregate with `aggregate_seq_mean_token_mean` to reproduce verl, which hard-codes
    seq-mean-token-mean for GSPO whatever `loss_agg_mode` says. Metrics: `pg_clipfrac` =
    frac[−A·clip(s) > −A·s], `pg_clipfrac_lower` = 0 (as verl), `ppo_kl` = mean(−Δ).
    As in verl, Δ is not clamped to ±20 here (the log of the sequence ratio is clamped at 10 instead).

    Zheng et al. 2025, arXiv:2507.18071. The paper's clip ranges are tiny (3e-4 / 4e-4).
    Differs from paper: this is the paper's GSPO-token objective, which equals GSPO (one sequence-level
    term per response) when the advantage is constant along each response, as with GRPO advantages.
    With one-token responses it equals `ppo_clip_loss` without dual clip.
    Shapes: logprobs, old_logprobs, advantages [B, T] float; response_mask [B, T] bool -> loss [B, T].
    """
    clip_low, clip_high = _check_clip(clip_low, clip_high)
    m = response_mask
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, m)

    delta = lp - old
    seq_log_ratio = masked_mean(delta.detach(), m, dim=-1)  # [B]; 0 for an empty row
    # Order as in verl (volcengine/verl#2775): the constant goes last to keep the value exact.
    log_ratio = (lp - lp.detach() + seq_log_ratio.unsqueeze(-1)).clamp(max=_GSPO_LOG_RATIO_MAX)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    metrics = {
        "pg_clipfrac": _fraction(loss_clipped > loss_unclipped, m),
        "pg_clipfrac_lower": _zero_metric(lp),
        "ppo_kl": _metric(-delta, m),
    }
    return LossOutput(_zero_where_masked(loss, m), metrics)


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> LossOutput:
    """CISPO: REINFORCE weighted by the clipped, stop-gradient importance ratio.

        L = −sg(clip(ρ, 1 − clip_low, 1 + clip_high)) · A · log π,   ρ = exp(clamp(Δ, −20, 20))

    Unlike PPO, a clipped token keeps its gradient (only its weight is bounded). Metrics:
    `pg_clipfrac` = frac[clip(ρ) ≠ ρ], `pg_clipfrac_lower` = 0 (as verl), `ppo_kl` = mean(−clamp(Δ)).
    verl aggregates with `loss_agg_mode` (default token-mean: `aggregate_token_mean`).

    MiniMax-M1, arXiv:2506.13585.
    Differs from paper: none in the formula; the paper imposes no lower bound on the weight (large
    ε_low): pass `clip_low=1.0` for that (the weight is then bounded below by 0, i.e. not at all).
    Shapes: logprobs, old_logprobs, advantages [B, T] float; response_mask [B, T] bool -> loss [B, T].
    """
    clip_low, clip_high = _check_clip(clip_low, clip_high)
    m = response_mask
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, m)

    log_ratio = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = -weight * adv * lp
    metrics = {
        "pg_clipfrac": _fraction(weight != ratio, m),
        "pg_clipfrac_lower": _zero_metric(lp),
        "ppo_kl": _metric(-log_ratio, m),
    }
    return LossOutput(_zero_where_masked(loss, m), metrics)


def sapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    tau_pos: float,
    tau_neg: float,
) -> LossOutput:
    """Soft Adaptive Policy Optimization: a smooth sigmoid gate instead of a hard clip.

        L = −A · σ(τ (ρ − 1)) · 4/τ,   τ = tau_pos where A > 0, tau_neg where A ≤ 0,
        ρ = exp(clamp(Δ, −20, 20))

    At ρ = 1 the gate's derivative w.r.t. log π is 1, so on-policy the gradient is REINFORCE's −A ∇log π;
    away from ρ = 1 it decays smoothly. Aggregate with `aggregate_seq_mean_token_mean` to reproduce
    verl (which hard-codes seq-mean-token-mean for SAPO). verl defaults: tau_pos = 1.0, tau_neg = 1.05.
    Metrics: `ppo_kl` = mean(−clamp(Δ)); `pg_clipfrac` and `pg_clipfrac_lower` are 0 (as verl: no clip).

    Gao et al. 2025 (Qwen), arXiv:2511.20347.
    Shapes: logprobs, old_logprobs, advantages [B, T] float; response_mask [B, T] bool -> loss [B, T].
    """
    tau_pos = _number("tau_pos", tau_pos, low=0.0, low_open=True)
    tau_neg = _number("tau_neg", tau_neg, low=0.0, low_open=True)
    m = response_mask
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, m)

    log_ratio = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    tau = torch.where(
        adv > 0,
        torch.tensor(tau_pos, dtype=ratio.dtype, device=ratio.device),
        torch.tensor(tau_neg, dtype=ratio.dtype, device=ratio.device),
    )
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = -gate * adv
    metrics = {
        "pg_clipfrac": _zero_metric(lp),
        "pg_clipfrac_lower": _zero_metric(lp),
        "ppo_kl": _metric(-log_ratio, m),
    }
    return LossOutput(_zero_where_masked(loss, m), metrics)


def gmpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> LossOutput:
    """Geometric-Mean Policy Optimization: a sequence loss on the geometric mean of token ratios.

        Δ'_it = min(Δ_it, clip_high) if A_it > 0;  max(Δ_it, −clip_low) if A_it < 0;  0 if A_it = 0
                (clipping in log space, only in the direction that would grow the objective)
        L_i   = −Ā_i · exp(Σ_t m_it Δ'_it / n_i),   Ā_i = Σ_t m_it A_it / n_i,  n_i = Σ_t m_it

    The loss is sequence-level. It is returned per token as L_i at every valid token of row i, so that
    `aggregate_seq_mean_token_mean` gives Σ_i L_i / B, verl's `mean(pg_losses)` (verl ignores
    `loss_agg_mode` for GMPO); other aggregations weight the rows differently (token-mean weights
    row i by n_i). clip_low, clip_high are log-space bounds (the paper uses 0.4, i.e. ratio e^±0.4).
    Metrics as verl: `pg_clipfrac` = frac[A > 0 and Δ outside [−clip_low, clip_high]],
    `pg_clipfrac_lower` = the same for A < 0 (tokens outside the band, whether or not the one-sided
    clip bound them), `ppo_kl` = mean(−clamp(Δ)).

    Zhao et al. 2025, arXiv:2507.20673.
    Differs from verl: Δ is clamped to ±20 first (verl leaves that guard commented out; identical for
    |Δ| ≤ 20, finite instead of inf beyond); a row with no valid token gives 0 and is not counted in
    `num_seqs`, where verl's `torch.mean` counts it in B.
    Shapes: logprobs, old_logprobs, advantages [B, T] float; response_mask [B, T] bool -> loss [B, T]
    (constant along each row's valid tokens).
    """
    clip_low = _number("clip_low", clip_low, low=0.0)
    clip_high = _number("clip_high", clip_high, low=0.0)
    m = response_mask
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, m)

    delta = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    clipped_delta = torch.where(
        adv > 0, delta.clamp(max=clip_high), torch.where(adv < 0, delta.clamp(min=-clip_low), zero)
    )
    seq_ratio = torch.exp(masked_mean(clipped_delta, m, dim=-1))  # [B]
    seq_adv = masked_mean(adv, m, dim=-1)  # [B]
    seq_loss = -seq_adv * seq_ratio
    loss = seq_loss.unsqueeze(-1).expand_as(lp)
    outside = (delta < -clip_low) | (delta > clip_high)
    metrics = {
        "pg_clipfrac": _fraction(outside & (adv > 0), m),
        "pg_clipfrac_lower": _fraction(outside & (adv < 0), m),
        "ppo_kl": _metric(-delta, m),
    }
    return LossOutput(_zero_where_masked(loss, m), metrics)


def clip_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_cov_ratio: float,
    clip_cov_lb: float,
    clip_cov_ub: float,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Clip-Cov: PPO clip, plus a random few high-covariance tokens get no gradient.

        L_it  = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)),   ρ = exp(clamp(Δ, −20, 20))
        cov_it = (A_it − Ā)(log π_it − mean log π)      (means over the valid tokens of this call)
        candidates: valid tokens not clipped by PPO with clip_cov_lb < cov < clip_cov_ub;
        k = max(1, ⌊clip_cov_ratio · N_tok⌋) of them, drawn uniformly without replacement
        (`torch.randperm(..., generator=generator)`), get L = 0 (and no gradient).

    No dual clip (as verl). Metrics: `pg_clipfrac` = fraction of valid tokens zeroed by the covariance
    rule (verl's meaning for this loss; PPO-clipped tokens are not counted), `ppo_kl` = mean(−clamp(Δ)).
    verl defaults: clip_cov_ratio = 2e-4, clip_cov_lb = 1.0, clip_cov_ub = 5.0; aggregation by
    `loss_agg_mode` (default token-mean). The covariance and N_tok are statistics of the tokens passed
    to this call (a micro-batch, in verl), so the selection depends on how the batch is split.

    Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv:2505.22617.
    Differs from verl: the argument is `clip_cov_ratio` (verl's name; `clip_ratio` in verl is PPO's ε),
    the randomness comes from `generator` instead of torch's global RNG (with the same RNG state the
    same tokens are drawn), and Δ is clamped to ±20 before exp (verl does not clamp here).
    Shapes: logprobs, old_logprobs, advantages [B, T] float; response_mask [B, T] bool -> loss [B, T].
    """
    clip_low, clip_high = _check_clip(clip_low, clip_high)
    clip_cov_ratio = _number("clip_cov_ratio", clip_cov_ratio, low=0.0, high=1.0, low_open=True)
    clip_cov_lb = _number("clip_cov_lb", clip_cov_lb)
    clip_cov_ub = _number("clip_cov_ub", clip_cov_ub)
    if not clip_cov_lb < clip_cov_ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {clip_cov_lb} and {clip_cov_ub}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    m = response_mask
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, m)

    log_ratio = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)

    with torch.no_grad():
        lp_d = lp.detach()
        cov = (adv - masked_mean(adv, m)) * (lp_d - masked_mean(lp_d, m))
        candidate = m & ~(loss_clipped > loss_unclipped) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        candidate_idx = candidate.flatten().nonzero().squeeze(-1)  # row-major, as verl's nonzero
        num_clip = max(int(clip_cov_ratio * int(m.sum())), 1)
        keep = torch.ones(m.shape, dtype=torch.bool, device=m.device)
        if candidate_idx.numel() > 0:
            perm_device = generator.device if generator is not None else candidate_idx.device
            perm = torch.randperm(candidate_idx.numel(), generator=generator, device=perm_device)
            chosen = candidate_idx[perm[:num_clip].to(candidate_idx.device)]
            keep.view(-1)[chosen] = False

    loss = torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    metrics = {"pg_clipfrac": _fraction(~keep, m), "ppo_kl": _metric(-log_ratio, m)}
    return LossOutput(_zero_where_masked(loss, m), metrics)


def kl_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    kl_cov_ratio: float,
    ppo_kl_coef: float,
) -> LossOutput:
    """KL-Cov: unclipped surrogate, plus a |Δ| penalty on the highest-covariance tokens.

        L_it = −A_it·ρ_it + ppo_kl_coef·|Δ_it|·[it ∈ top-k of cov],   ρ = exp(clamp(Δ, −20, 20))
        cov_it = (A_it − Ā)(log π_it − mean log π)      (means over the valid tokens of this call)
        k = min(N_tok, max(1, ⌊kl_cov_ratio · N_tok⌋)); none when N_tok = 0

    Deterministic (torch.topk over the valid tokens in row-major order, as verl). Metric: `ppo_kl` =
    mean |Δ| over the valid tokens: verl logs the *absolute* log-ratio under this name for KL-Cov.
    verl defaults (actor config): kl_cov_ratio = 2e-4, ppo_kl_coef = 0.1; aggregation by `loss_agg_mode` (default token-mean). The covariance and N_tok are statistics of the
    tokens passed to this call, so the selection depends on how the batch is split.

    Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv:2505.22617.
    Differs from verl: ρ uses Δ clamped to ±20 (verl does not clamp; |Δ| is unclamped in both), and
    kl_cov_ratio must be ≤ 1 (verl would fail in topk beyond).
    Shapes: logprobs, old_logprobs, advantages [B, T] float; response_mask [B, T] bool -> loss [B, T].
    """
    kl_cov_ratio = _number("kl_cov_ratio", kl_cov_ratio, low=0.0, high=1.0, low_open=True)
    ppo_kl_coef = _number("ppo_kl_coef", ppo_kl_coef, low=0.0)
    m = response_mask
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, m)

    delta = lp - old
    abs_kl = delta.abs()
    ratio = torch.exp(delta.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    loss = -adv * ratio

    with torch.no_grad():
        selected = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
        valid_idx = m.flatten().nonzero().squeeze(-1)
        n_tok = valid_idx.numel()
        if n_tok > 0:
            lp_d = lp.detach()
            cov = (adv - masked_mean(adv, m)) * (lp_d - masked_mean(lp_d, m))
            k = min(n_tok, max(1, int(n_tok * kl_cov_ratio)))
            top = torch.topk(cov.flatten()[valid_idx], k, largest=True).indices
            selected.view(-1)[valid_idx[top]] = True

    loss = torch.where(selected, loss + ppo_kl_coef * abs_kl, loss)
    metrics = {"ppo_kl": _metric(abs_kl, m)}
    return LossOutput(_zero_where_masked(loss, m), metrics)


def reinforce_loss(
    logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    importance_weights: Tensor | None = None,
) -> LossOutput:
    """REINFORCE / GPG policy-gradient loss.

        L = −A · log π  [· sg(w)]

    verl's "gpg" policy loss (aggregated by `loss_agg_mode`, default token-mean); verl multiplies
    rollout-correction weights in the same way. `importance_weights` (e.g. from rlprims rollout
    correction) are detached. No metrics (verl returns none for this loss).

    Williams 1992, "Simple statistical gradient-following algorithms" (Machine Learning 8);
    GPG: Chu et al. 2025, arXiv:2504.02546.
    Shapes: logprobs, advantages [B, T] float; response_mask [B, T] bool;
    importance_weights [B, T] float or None -> loss [B, T].
    """
    tensors = {"logprobs": logprobs, "advantages": advantages}
    if importance_weights is not None:
        tensors["importance_weights"] = importance_weights
    _check_tokens("response_mask", response_mask, **tensors)
    m = response_mask
    lp = _zero_where_masked(logprobs, m)
    adv = _zero_where_masked(advantages.detach(), m)
    loss = -adv * lp
    if importance_weights is not None:
        loss = loss * _zero_where_masked(importance_weights.detach(), m)
    return LossOutput(_zero_where_masked(loss, m), {})


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_range: float,
) -> LossOutput:
    """Clipped value-function loss.

        L = ½ · max((V − R)², (clip(V, V_old − clip_range, V_old + clip_range) − R)²)

    Metric `vf_clipfrac` = frac[clipped term > unclipped term]. verl multiplies the aggregated loss by ½
    (the same thing) and aggregates with `loss_agg_mode` (default token-mean); verl's default
    clip_range (`cliprange_value`) is 0.5.

    Value clipping is from OpenAI baselines' PPO2, used with Schulman et al. 2017, arXiv:1707.06347.
    Differs from paper: the PPO paper's value loss is the unclipped (V − R)².
    Shapes: values, old_values, returns [B, T] float; response_mask [B, T] bool -> loss [B, T].
    """
    clip_range = _number("clip_range", clip_range, low=0.0)
    _check_tokens("response_mask", response_mask, values=values, old_values=old_values, returns=returns)
    m = response_mask
    v = _zero_where_masked(values, m)
    old = _zero_where_masked(old_values.detach(), m)
    ret = _zero_where_masked(returns.detach(), m)
    v_clipped = torch.clamp(v, old - clip_range, old + clip_range)
    loss_unclipped = (v - ret) ** 2
    loss_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    metrics = {"vf_clipfrac": _fraction(loss_clipped > loss_unclipped, m)}
    return LossOutput(_zero_where_masked(loss, m), metrics)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits) over the last dim.

        H = logsumexp(z) − Σ_v softmax(z)_v z_v

    Computed as H = logsumexp(z') + Σ_v p_v (−z'_v) with z' = z − max(z): both terms are ≥ 0, so H is
    finite and ≥ 0 for any finite logits (no cancellation between two numbers of size |z| as in the
    direct form, which goes negative in fp32 for logits of ~1e4). Logits of −inf (banned tokens) are
    allowed as long as one logit per row is finite. Computed in the dtype of `logits` (pass fp32 logits
    for an fp32 entropy). Differentiable; verl adds −entropy_coeff · agg(H) to the actor loss.
    Shapes: logits [..., V] float -> [...].
    """
    check_tensor("logits", logits, floating=True)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    z = logits - logits.detach().amax(dim=-1, keepdim=True)
    p = torch.softmax(z, dim=-1)
    # p = 0 exactly where z' = −inf; route those entries away from the product (no 0·inf).
    z_finite = torch.where(p > 0, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return torch.logsumexp(z, dim=-1) - (p * z_finite).sum(dim=-1)

"""KL estimators between the policy and a reference, the KL penalty in the reward, and KL controllers.

Per-token estimators of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020,
http://joschu.net/blog/kl-approx.html), with Δ = log π − log π_ref:

    k1 = Δ                     unbiased, high variance, can be negative
    k2 = ½ Δ²                  biased, but its gradient is the gradient of KL in expectation
    k3 = e^(−Δ) + Δ − 1        unbiased, ≥ 0, low variance ("low_var_kl" in verl)
    abs = |Δ|

The `_st` ("straight-through", verl's "k1+", "k3+", "abs+") variants return the value of the named
estimator with the gradient of k2: the value is what you log and penalize, the gradient is the one whose
expectation is ∇KL.

The estimators are element-wise and take no mask: position (b, t) of the output depends only on position
(b, t) of the inputs, so whatever sits in padding stays in padding, and the masked aggregation
(`rlprims.ops.reduce`) selects it away. Keep padding finite if you back-propagate: autograd multiplies the
zero gradient of a masked position by the local derivative, and 0 · NaN is NaN.

KL in the reward (`kl_in_reward`) and the coefficient controllers (`fixed_kl_*`, `adaptive_kl_*`) follow
verl's `apply_kl_penalty`, `FixedKLController` and `AdaptiveKLController` (Ziegler et al. 2019,
arXiv:1909.08593).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlprims.ops._validate import check_finite, check_mask, check_positive, check_same_shape, check_tensor
from rlprims.ops.reduce import masked_mean

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_abs",
    "kl_k1_st",
    "kl_k3_st",
    "kl_abs_st",
    "KLRewardResult",
    "kl_in_reward",
    "FixedKLState",
    "fixed_kl_init",
    "fixed_kl_update",
    "AdaptiveKLState",
    "adaptive_kl_init",
    "adaptive_kl_update",
]

# verl's numerical guards for k3: the log-ratio is clamped before exp, the value after.
_K3_LOG_CLAMP = 20.0
_K3_VALUE_CLAMP = 10.0


def _delta(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return logprobs - ref_logprobs


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(π ‖ π_ref):  k1 = Δ = log π − log π_ref.

    Unbiased for tokens sampled from π; single values can be negative. verl: kl_penalty "k1" / "kl".
    Schulman 2020, http://joschu.net/blog/kl-approx.html.
    Shapes: logprobs [B, T], ref_logprobs [B, T] -> [B, T] (element-wise; any equal shapes work).
    """
    return _delta(logprobs, ref_logprobs)


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k2 estimate of KL(π ‖ π_ref):  k2 = ½ Δ²,  Δ = log π − log π_ref.

    Biased for the value, but with the samples held fixed E_π[∇k2] = E_π[Δ ∇log π] = ∇KL(π ‖ π_ref),
    which is why the `_st` variants borrow its gradient. verl: kl_penalty "k2" / "mse".
    Schulman 2020, http://joschu.net/blog/kl-approx.html.
    Shapes: logprobs [B, T], ref_logprobs [B, T] -> [B, T].
    """
    return 0.5 * _delta(logprobs, ref_logprobs).square()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 ("low-variance") estimate of KL(π ‖ π_ref), clamped as verl does.

    x = clamp(log π_ref − log π, −20, 20);   k3 = clamp(eˣ − x − 1, −10, 10).
    Unbiased and ≥ 0 before the clamps; the clamps (verl's) keep it finite for any input, at the price of
    a zero gradient where they bind (|Δ| > 20, or a value above 10, i.e. Δ < −2.6 or Δ > 11.0 roughly).
    verl: kl_penalty "k3" / "low_var_kl"; the default estimator of the KL loss.
    Schulman 2020, http://joschu.net/blog/kl-approx.html.
    Shapes: logprobs [B, T], ref_logprobs [B, T] -> [B, T].
    """
    x = (-_delta(logprobs, ref_logprobs)).clamp(-_K3_LOG_CLAMP, _K3_LOG_CLAMP)
    return (torch.exp(x) - x - 1.0).clamp(-_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token |Δ| = |log π − log π_ref| (verl's kl_penalty "abs"; not an unbiased KL estimate).

    Shapes: logprobs [B, T], ref_logprobs [B, T] -> [B, T].
    """
    return _delta(logprobs, ref_logprobs).abs()


def _straight_through_k2(value: Tensor, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # k2 − sg(k2) is exactly 0 (k2 is finite for |Δ| < 2.6e19 in fp32), so the value is exactly `value`;
    # the only differentiable term is k2, so the gradient is exactly k2's.
    k2 = kl_k2(logprobs, ref_logprobs)
    return k2 - k2.detach() + value.detach()


def kl_k1_st(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 value with the k2 gradient (verl's "k1+"):  out = sg(k1) + k2 − sg(k2).

    Forward: exactly `kl_k1`. Backward: exactly `kl_k2`'s, ∂out/∂log π = Δ, ∂out/∂log π_ref = −Δ.
    Same numbers as verl's "+" definition (some verl versions fail to strip the "+" in the dispatcher
    and reject the name; here each variant is its own function).
    Schulman 2020, http://joschu.net/blog/kl-approx.html.
    Shapes: logprobs [B, T], ref_logprobs [B, T] -> [B, T].
    """
    return _straight_through_k2(kl_k1(logprobs, ref_logprobs), logprobs, ref_logprobs)


def kl_k3_st(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 value with the k2 gradient (verl's "k3+"):  out = sg(k3) + k2 − sg(k2).

    Forward: exactly `kl_k3` (clamped as verl). Backward: exactly `kl_k2`'s (not clamped: the gradient is
    Δ even where k3's clamps bind).
    Shapes: logprobs [B, T], ref_logprobs [B, T] -> [B, T].
    """
    return _straight_through_k2(kl_k3(logprobs, ref_logprobs), logprobs, ref_logprobs)


def kl_abs_st(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """|Δ| value with the k2 gradient (verl's "abs+"):  out = sg(|Δ|) + k2 − sg(k2).

    Shapes: logprobs [B, T], ref_logprobs [B, T] -> [B, T].
    """
    return _straight_through_k2(kl_abs(logprobs, ref_logprobs), logprobs, ref_logprobs)


class KLRewardResult(NamedTuple):
    rewards: Tensor  # [B, T]: r_t − β·kl_t on valid tokens, 0 elsewhere
    metrics: dict[str, Tensor]  # actor/reward_kl_penalty, actor/reward_kl_penalty_coeff


def kl_in_reward(
    token_rewards: Tensor, kl: Tensor, response_mask: Tensor, *, kl_coef: float
) -> KLRewardResult:
    """Token rewards with the KL penalty folded in:  r'_t = r_t − β · kl_t  on valid tokens.

    `kl` is a per-token estimate of KL(π_old ‖ π_ref) (e.g. `kl_k1(old_logprobs, ref_logprobs)`, verl's
    default `algorithm.kl_penalty="kl"`), `kl_coef` the current β of a controller.
    Positions under a False mask are 0 in the output (verl keeps `token_level_scores` there, which is 0 for
    right padding), whatever `token_rewards` and `kl` hold there.

    Metrics (verl's names, detached 0-dim tensors):
      actor/reward_kl_penalty        mean over sequences of the per-sequence token-mean of kl; feed it
                                     (as a float) to `adaptive_kl_update(current_kl=...)`
      actor/reward_kl_penalty_coeff  β
    Differs from verl: a sequence with no valid token is left out of the mean over sequences (verl counts
    it as 0); no valid token at all gives 0.
    Ziegler et al. 2019, arXiv:1909.08593 (per-token KL penalty in the reward).
    Shapes: token_rewards [B, T], kl [B, T], response_mask [B, T] bool -> rewards [B, T].
    """
    check_tensor("token_rewards", token_rewards, ndim=2)
    check_same_shape(token_rewards=token_rewards, kl=kl)
    check_mask("response_mask", response_mask, token_rewards.shape)
    beta = check_positive("kl_coef", kl_coef, allow_zero=True)
    if math.isinf(beta):
        raise ValueError(f"kl_coef must be finite, got {kl_coef}")
    check_finite("token_rewards", token_rewards, response_mask)
    check_finite("kl", kl, response_mask)

    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    rewards = torch.where(response_mask, token_rewards - beta * kl, zero)

    with torch.no_grad():
        per_seq = masked_mean(kl.detach(), response_mask, dim=-1)
        has_tokens = response_mask.any(dim=-1)
        current_kl = masked_mean(per_seq, has_tokens)
    metrics = {
        "actor/reward_kl_penalty": current_kl,
        "actor/reward_kl_penalty_coeff": torch.tensor(beta, dtype=kl.dtype, device=kl.device),
    }
    return KLRewardResult(rewards, metrics)


# ---------------------------------------------------------------------------------------------------
# KL coefficient controllers: pure init/update pairs.


class FixedKLState(NamedTuple):
    kl_coef: float  # β


class AdaptiveKLState(NamedTuple):
    kl_coef: float  # current β
    target_kl: float
    horizon: float


def _check_current_kl(current_kl: float | Tensor) -> float:
    if isinstance(current_kl, Tensor):
        if current_kl.numel() != 1:
            raise ValueError(f"current_kl must be a scalar, got shape {tuple(current_kl.shape)}")
        current_kl = float(current_kl.detach())
    if (
        isinstance(current_kl, bool)
        or not isinstance(current_kl, (int, float))
        or not math.isfinite(current_kl)
    ):
        raise ValueError(f"current_kl must be a finite number, got {current_kl!r}")
    return float(current_kl)


def _check_n_steps(n_steps: int) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0 (verl passes the batch size), got {n_steps!r}")
    return n_steps


def fixed_kl_init(*, kl_coef: float) -> FixedKLState:
    """State of a constant KL coefficient β (verl's FixedKLController; verl's default β = 0.001).

    β_k = kl_coef for every step k. Pair with `fixed_kl_update`.
    Shapes: floats only.
    """
    beta = check_positive("kl_coef", kl_coef, allow_zero=True)
    if math.isinf(beta):
        raise ValueError(f"kl_coef must be finite, got {kl_coef}")
    return FixedKLState(kl_coef=beta)


def fixed_kl_update(state: FixedKLState, *, current_kl: float | Tensor, n_steps: int) -> FixedKLState:
    """β unchanged (the arguments are checked, then ignored, so the two controllers are interchangeable).

    β ← β.
    Shapes: current_kl a float or 0-dim tensor.
    """
    if not isinstance(state, FixedKLState):
        raise ValueError(f"state must be a FixedKLState, got {type(state).__name__}")
    _check_current_kl(current_kl)
    _check_n_steps(n_steps)
    return state


def adaptive_kl_init(*, init_kl_coef: float, target_kl: float, horizon: float) -> AdaptiveKLState:
    """State of the adaptive KL coefficient of Ziegler et al. 2019, arXiv:1909.08593.

    verl's defaults: init_kl_coef 0.001, target_kl 0.1, horizon 10000.
    """
    beta = check_positive("init_kl_coef", init_kl_coef, allow_zero=True)
    target = check_positive("target_kl", target_kl)
    hor = check_positive("horizon", horizon)
    for name, v in (("init_kl_coef", beta), ("target_kl", target), ("horizon", hor)):
        if math.isinf(v):
            raise ValueError(f"{name} must be finite, got {v}")
    return AdaptiveKLState(kl_coef=beta, target_kl=target, horizon=hor)


def adaptive_kl_update(
    state: AdaptiveKLState, *, current_kl: float | Tensor, n_steps: int
) -> AdaptiveKLState:
    """Proportional controller on β:  e = clip(KL/target − 1, −0.2, 0.2);  β ← β · (1 + e · n / horizon).

    `current_kl` is the measured KL (verl: `actor/reward_kl_penalty` of `kl_in_reward`), `n_steps` the
    number of samples since the last update (verl passes the batch size).
    Ziegler et al. 2019, arXiv:1909.08593, eq. (2).
    Shapes: current_kl a float or 0-dim tensor.
    """
    if not isinstance(state, AdaptiveKLState):
        raise ValueError(f"state must be an AdaptiveKLState, got {type(state).__name__}")
    kl = _check_current_kl(current_kl)
    n = _check_n_steps(n_steps)
    error = min(max(kl / state.target_kl - 1.0, -0.2), 0.2)
    return state._replace(kl_coef=state.kl_coef * (1.0 + error * n / state.horizon))

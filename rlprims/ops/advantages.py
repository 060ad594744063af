"""Advantage estimators: one pure function per estimator, numbers as verl computes them.

Conventions shared by every function here:
- Token tensors are `[B, T]` and already shifted; `response_mask` is `[B, T]` bool. Per-sequence
  scores are `[B]`; a group is `group_size` contiguous rows (the responses to one prompt).
- Every output is 0 where `response_mask` is False, and values there (rewards, values, even NaN or
  inf) never change any output. verl leaves carried or garbage values at those positions; they are
  never used by a loss, so only the masked-out entries differ from verl.
- Masked positions are transparent: the recursions skip them and carry their running value across,
  so right padding and holes inside a response (multi-turn observation tokens) both work.
- Outcome estimators broadcast one scalar per response over its response tokens.
- Nothing here is differentiated: every function runs under `torch.no_grad()` (as verl does).
- A group whose scores are all equal gets exactly 0 advantage (set explicitly, so no rounding noise
  from the mean survives), for every group estimator before any batch whitening.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlprims.ops._validate import (
    check_finite,
    check_group_size,
    check_mask,
    check_positive,
    check_same_shape,
    check_scores,
    check_tensor,
)
from rlprims.ops.reduce import masked_whiten

__all__ = [
    "AdvantagesReturns",
    "drgrpo_advantages",
    "gae_advantages",
    "gae_advantages_unwhitened",
    "gpg_advantages",
    "grpo_advantages",
    "grpo_passk_advantages",
    "opo_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
]


class AdvantagesReturns(NamedTuple):
    """Per-token advantages and returns, both `[B, T]` and 0 where `response_mask` is False."""

    advantages: Tensor
    returns: Tensor


# ----------------------------------------------------------------------------------------------------
# Input checks and group helpers


def _check_unit_interval(name: str, value: float) -> float:
    check_positive(name, value, allow_zero=True)
    if value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_token_inputs(response_mask: Tensor, **tensors: Tensor) -> None:
    """Token tensors: floating, one [B, T] shape, finite where the mask is True."""
    shape = check_same_shape(**tensors)
    first = next(iter(tensors))
    if len(shape) != 2:
        raise ValueError(f"{first} must be [B, T], got shape {tuple(shape)}")
    check_mask("response_mask", response_mask, shape)
    for name, t in tensors.items():
        check_finite(name, t, response_mask)


def _check_outcome_inputs(scores: Tensor, response_mask: Tensor) -> None:
    """scores [B] floating and finite; response_mask [B, T] bool."""
    check_scores("scores", scores)
    check_tensor("response_mask", response_mask, ndim=2)
    check_mask("response_mask", response_mask, (scores.shape[0], response_mask.shape[1]))


def _broadcast(per_seq: Tensor, response_mask: Tensor) -> Tensor:
    """[B] -> [B, T]: the sequence's value on its response tokens, 0 elsewhere."""
    zero = torch.zeros((), dtype=per_seq.dtype, device=per_seq.device)
    return torch.where(response_mask, per_seq[:, None], zero)


def _constant_groups(grouped: Tensor) -> Tensor:
    """[G, n] -> [G, 1] bool: True where all n scores of the group are equal."""
    return grouped.amax(dim=-1, keepdim=True) == grouped.amin(dim=-1, keepdim=True)


def _centered(scores: Tensor, group_size: int) -> Tensor:
    """r_i − mean_g as [G, n]; a singleton group has mean 0 (verl); equal scores give exactly 0."""
    grouped = scores.reshape(-1, group_size)
    if group_size == 1:
        return grouped.clone()
    centered = grouped - grouped.mean(dim=-1, keepdim=True)
    return torch.where(_constant_groups(grouped), torch.zeros_like(centered), centered)


# ----------------------------------------------------------------------------------------------------
# Token-level estimators (GAE, REINFORCE++, ReMax)


@torch.no_grad()
def gae_advantages_unwhitened(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float, lam: float
) -> AdvantagesReturns:
    """Generalized advantage estimates and returns, before whitening.

    Over the valid positions t of a row (t' the next valid position after t; past the last one
    V_{t'} = 0 and A_{t'} = 0):
        δ_t = r_t + γ V_{t'} − V_t,    A_t = δ_t + γλ A_{t'},    R_t = A_t + V_t.
    Masked positions are skipped and carry V and A unchanged (verl's recursion): right padding is
    transparent, and a hole (masked observation tokens in a multi-turn response) is bridged as if
    absent, so γ discounts per valid token. With λ = 1, A_t = Σ_k γ^k r_{t_k} − V_t (discounted
    return minus value); with λ = 0, A_t = δ_t.
    Schulman et al. 2015, arXiv:1506.02438. `gae_advantages` whitens these advantages (verl's
    default); use this function when you whiten yourself (e.g. across data-parallel ranks) or not.
    Shapes: token_rewards, values [B, T] float, response_mask [B, T] bool -> two [B, T] tensors,
    0 where response_mask is False.
    """
    _check_token_inputs(response_mask, token_rewards=token_rewards, values=values)
    gamma = _check_unit_interval("gamma", gamma)
    lam = _check_unit_interval("lam", lam)

    batch, length = token_rewards.shape
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        valid = response_mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # torch.where (not x*m): NaN/inf in masked rewards or values cannot reach the carry.
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = next_adv
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    advantages = torch.where(response_mask, advantages, zero)
    returns = torch.where(response_mask, advantages + values, zero)
    return AdvantagesReturns(advantages=advantages, returns=returns)


@torch.no_grad()
def gae_advantages(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float, lam: float
) -> AdvantagesReturns:
    """GAE advantages whitened over the batch's valid tokens, and unwhitened returns (verl's GAE).

    A, R = gae_advantages_unwhitened(...);  returns R = A + V (before whitening);
    advantages = (A − μ) / sqrt(σ² + 1e-8), μ and unbiased σ² over all tokens where the mask is True.
    Schulman et al. 2015, arXiv:1506.02438 (whitening as in verl and TRL's PPO).
    Note: the whitening statistics are those of this call's batch; to whiten over the whole
    optimizer step across data-parallel ranks, call `gae_advantages_unwhitened` and whiten with
    globally reduced statistics.
    Shapes: token_rewards, values [B, T] float, response_mask [B, T] bool -> two [B, T] tensors,
    0 where response_mask is False.
    """
    raw = gae_advantages_unwhitened(token_rewards, values, response_mask, gamma=gamma, lam=lam)
    return AdvantagesReturns(advantages=masked_whiten(raw.advantages, response_mask), returns=raw.returns)


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: Tensor, response_mask: Tensor, *, gamma: float
) -> AdvantagesReturns:
    """REINFORCE++: discounted return-to-go per response, whitened over the batch's valid tokens.

    G_t = r_t + γ G_{t'} (t' the next valid position of the row, G = 0 past the last one);
    advantages = (G − μ) / sqrt(σ² + 1e-8), μ and unbiased σ² over valid tokens; returns = G.
    Rewards usually hold the outcome score on the last response token minus a per-token KL penalty.
    Hu 2025, arXiv:2501.03262.
    Differs from verl: verl resets the running return at every masked position, so across a hole in
    the mask (multi-turn observation tokens) rewards after the hole never reach earlier turns. Here
    masked positions are transparent, as in verl's GAE and ReMax. For right-padded masks (no holes)
    the two agree exactly.
    Shapes: token_rewards [B, T] float, response_mask [B, T] bool -> two [B, T] tensors,
    0 where response_mask is False.
    """
    _check_token_inputs(response_mask, token_rewards=token_rewards)
    gamma = _check_unit_interval("gamma", gamma)

    batch, length = token_rewards.shape
    running = torch.zeros(batch, dtype=token_rewards.dtype, device=token_rewards.device)
    returns = torch.zeros_like(token_rewards)
    for t in reversed(range(length)):
        running = torch.where(response_mask[:, t], token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    zero = torch.zeros((), dtype=returns.dtype, device=returns.device)
    returns = torch.where(response_mask, returns, zero)
    return AdvantagesReturns(advantages=masked_whiten(returns, response_mask), returns=returns)


@torch.no_grad()
def remax_advantages(
    token_rewards: Tensor, response_mask: Tensor, baseline_scores: Tensor
) -> AdvantagesReturns:
    """ReMax: undiscounted return-to-go minus the reward of the greedy response to the same prompt.

    G_t = Σ_{s ≥ t, valid} r_s,   A_t = G_t − b,   b = baseline_scores[i] (reward of the greedy
    decode for row i's prompt). No whitening. returns = G.
    Li et al. 2023, arXiv:2310.10505. Same numbers as verl's `compute_remax_outcome_advantage`
    on valid tokens.
    Shapes: token_rewards [B, T] float, response_mask [B, T] bool, baseline_scores [B] float ->
    two [B, T] tensors, 0 where response_mask is False.
    """
    _check_token_inputs(response_mask, token_rewards=token_rewards)
    check_scores("baseline_scores", baseline_scores, batch=token_rewards.shape[0])

    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    rewards = torch.where(response_mask, token_rewards, zero)
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    returns = torch.where(response_mask, returns, zero)
    advantages = torch.where(response_mask, returns - baseline_scores[:, None], zero)
    return AdvantagesReturns(advantages=advantages, returns=returns)


# ----------------------------------------------------------------------------------------------------
# Outcome (one scalar per response) group estimators


@torch.no_grad()
def grpo_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: each response's score standardized within its group, broadcast over its tokens.

    A_i = (r_i − mean_g) / (std_g + eps),  std unbiased (torch.std), as verl.
    Singleton group (group_size = 1): mean 0, std 1, so A_i = r_i / (1 + eps) (verl).
    Zero-variance group (all scores equal, group_size ≥ 2): A_i = 0 exactly.
    Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300.
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T], 0 where response_mask is False.
    """
    _check_outcome_inputs(scores, response_mask)
    n = check_group_size(scores.shape[0], group_size)
    eps = check_positive("eps", eps, allow_zero=True)

    grouped = scores.reshape(-1, n)
    if n == 1:
        adv = grouped / (1.0 + eps)
    else:
        std = grouped.std(dim=-1, keepdim=True)
        adv = _centered(scores, n) / (std + eps)
        adv = torch.where(_constant_groups(grouped), torch.zeros_like(adv), adv)
    return _broadcast(adv.reshape(-1), response_mask)


@torch.no_grad()
def drgrpo_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int) -> Tensor:
    """Dr.GRPO: group-mean-centred score without the std division, broadcast over response tokens.

    A_i = r_i − mean_g (verl's GRPO with norm_adv_by_std_in_grpo=False).
    Singleton group: mean 0, so A_i = r_i (verl). Zero-variance group: A_i = 0 exactly.
    Liu et al. 2025 (Dr.GRPO), arXiv:2503.20783. Pair it with the constant-normalizer aggregation
    `aggregate_seq_mean_token_sum_norm` for the paper's full fix.
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T], 0 where response_mask is False.
    """
    _check_outcome_inputs(scores, response_mask)
    n = check_group_size(scores.shape[0], group_size)
    return _broadcast(_centered(scores, n).reshape(-1), response_mask)


@torch.no_grad()
def rloo_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int) -> Tensor:
    """RLOO: score minus the mean of the other responses of its group, broadcast over its tokens.

    A_i = r_i − (1/(n−1)) Σ_{j≠i} r_j = n/(n−1) · (r_i − mean_g),  n = group_size.
    Singleton group: no other response, A_i = r_i unchanged (verl). Zero-variance group: A_i = 0.
    Ahmadian et al. 2024, arXiv:2402.14740 (leave-one-out baseline: Kool et al. 2019).
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T], 0 where response_mask is False.
    """
    _check_outcome_inputs(scores, response_mask)
    n = check_group_size(scores.shape[0], group_size)
    adv = _centered(scores, n)
    if n > 1:
        adv = adv * (n / (n - 1))
    return _broadcast(adv.reshape(-1), response_mask)


@torch.no_grad()
def reinforce_pp_baseline_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int) -> Tensor:
    """REINFORCE++ with baseline: group-mean-centred score, broadcast, then whitened over the batch.

    c_i = r_i − mean_g (singleton: mean 0, c_i = r_i; zero-variance group: c_i = 0 exactly);
    A_it = (c_i − μ) / sqrt(σ² + 1e-8), μ and unbiased σ² over all valid tokens of the batch (so a
    long response weighs more in μ and σ², as in verl). After whitening a zero-variance group's
    advantage is −μ/σ, not 0 (verl's numbers).
    Hu 2025, arXiv:2501.03262.
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T], 0 where response_mask is False.
    """
    _check_outcome_inputs(scores, response_mask)
    n = check_group_size(scores.shape[0], group_size)
    centered = _broadcast(_centered(scores, n).reshape(-1), response_mask)
    return masked_whiten(centered, response_mask)


@torch.no_grad()
def opo_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int) -> Tensor:
    """OPO: score minus the length-weighted group mean, broadcast over response tokens.

    b_g = Σ_j |o_j| r_j / Σ_j |o_j|,  |o_j| = Σ_t response_mask[j, t];   A_i = r_i − b_g.
    Singleton group: b = 0, A_i = r_i (verl). Zero-variance group: A_i = 0 exactly.
    A group whose responses are all empty (Σ|o| = 0, where verl divides 0 by 0) uses the plain
    mean; its output is all 0 anyway, since it has no response tokens.
    Hao et al. 2025 (On-Policy RL with Optimal reward baseline), arXiv:2505.23585.
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T], 0 where response_mask is False.
    """
    _check_outcome_inputs(scores, response_mask)
    n = check_group_size(scores.shape[0], group_size)

    grouped = scores.reshape(-1, n)
    if n == 1:
        adv = grouped
    else:
        lengths = response_mask.sum(dim=-1).to(scores.dtype).reshape(-1, n)
        total = lengths.sum(dim=-1, keepdim=True)
        weighted = (lengths * grouped).sum(dim=-1, keepdim=True) / total.clamp(min=1)
        baseline = torch.where(total > 0, weighted, grouped.mean(dim=-1, keepdim=True))
        adv = grouped - baseline
        adv = torch.where(_constant_groups(grouped), torch.zeros_like(adv), adv)
    return _broadcast(adv.reshape(-1), response_mask)


@torch.no_grad()
def gpg_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int) -> Tensor:
    """GPG: group-mean-centred score rescaled by the batch's share of nonzero scores.

    A_i = α (r_i − mean_g),  α = B / max(#{i : r_i ≠ 0}, 1),  B the number of rows in this call.
    Singleton group: mean 0 (verl). Zero-variance group: A_i = 0 exactly. All scores 0: every
    advantage is 0 (α = B then multiplies zeros).
    α depends on the whole batch: call it on the full batch of the optimizer step (gathered across
    data-parallel ranks), not per rank or micro-batch.
    Chu et al. 2025, arXiv:2504.02546.
    Differs from paper: the paper derives α from the responses in groups whose rewards differ;
    verl (whose numbers are followed here) counts nonzero scores. verl's `f_norm` (always 1) is
    omitted.
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T], 0 where response_mask is False.
    """
    _check_outcome_inputs(scores, response_mask)
    n = check_group_size(scores.shape[0], group_size)

    batch = scores.shape[0]
    nonzero = torch.count_nonzero(scores).clamp(min=1).to(scores.dtype)
    alpha = batch / nonzero
    return _broadcast((alpha * _centered(scores, n)).reshape(-1), response_mask)


@torch.no_grad()
def grpo_passk_advantages(
    scores: Tensor, response_mask: Tensor, *, group_size: int, norm_by_std: bool, eps: float = 1e-6
) -> Tensor:
    """GRPO for pass@k: only the best response of each group gets a nonzero advantage.

    For the group's best response: A = r_max − r_second  (divided by std_g + eps if `norm_by_std`,
    std unbiased); every other response: A = 0. Needs group_size ≥ 2.
    Ties for the best: r_max − r_second = 0, so every response of the group gets 0 (verl gives
    the same). `norm_by_std=True` is verl's default (norm_adv_by_std_in_grpo).
    Pass@k training as cited by verl: arXiv:2503.19595.
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T], 0 where response_mask is False.
    """
    _check_outcome_inputs(scores, response_mask)
    n = check_group_size(scores.shape[0], group_size, min_size=2)
    if not isinstance(norm_by_std, bool):
        raise ValueError(f"norm_by_std must be a bool, got {norm_by_std!r}")
    eps = check_positive("eps", eps, allow_zero=True)

    grouped = scores.reshape(-1, n)
    top2 = grouped.topk(2, dim=-1).values
    gap = top2[:, :1] - top2[:, 1:]  # [G, 1], >= 0
    if norm_by_std:
        std = grouped.std(dim=-1, keepdim=True)
        # gap > 0 implies std > 0, so this never divides 0 by 0, even with eps = 0.
        gap = torch.where(gap > 0, gap / (std + eps), torch.zeros_like(gap))
    best = grouped.argmax(dim=-1, keepdim=True)
    adv = torch.zeros_like(grouped).scatter(-1, best, gap)
    return _broadcast(adv.reshape(-1), response_mask)

"""Advantage estimators with a batch-wide statistic, over every rank's rows.

Groups never span ranks (a rank samples whole groups), so group statistics need no communication; but
verl computes some estimators on the whole batch on its driver: the whitening of GAE and REINFORCE++
(mean and variance over all valid tokens) and GPG's α (over all responses). Each function here equals
its `rlprims.ops` counterpart applied to all ranks' rows together (tested on gloo); `group` is the
data-parallel group (`mesh["dp"]`, a ProcessGroup, or None: see `rlprims.parallel.stats`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rlprims.ops.advantages import (
    AdvantagesReturns,
    drgrpo_advantages,
    gae_advantages_unwhitened,
    reinforce_pp_advantages,
)
from rlprims.parallel.stats import Group, _all_reduce, dist_masked_whiten

__all__ = [
    "dist_gae_advantages",
    "dist_reinforce_pp_advantages",
    "dist_reinforce_pp_baseline_advantages",
    "dist_gpg_advantages",
]


def dist_gae_advantages(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float, lam: float, group: Group
) -> AdvantagesReturns:
    """`rlprims.ops.gae_advantages` of the whole batch: GAE per row, then A whitened over every rank's
    valid tokens (`dist_masked_whiten`); returns = A + V before whitening (not whitened).

    Shapes: token_rewards, values [B, T] float, response_mask [B, T] bool -> two [B, T] tensors.
    """
    gae = gae_advantages_unwhitened(token_rewards, values, response_mask, gamma=gamma, lam=lam)
    return AdvantagesReturns(dist_masked_whiten(gae.advantages, response_mask, group=group), gae.returns)


def dist_reinforce_pp_advantages(
    token_rewards: Tensor, response_mask: Tensor, *, gamma: float, group: Group
) -> AdvantagesReturns:
    """`rlprims.ops.reinforce_pp_advantages` of the whole batch: G_t = r_t + γ G_{t'} per row, whitened
    over every rank's valid tokens; returns = G.

    Shapes: token_rewards [B, T] float, response_mask [B, T] bool -> two [B, T] tensors.
    """
    returns = reinforce_pp_advantages(token_rewards, response_mask, gamma=gamma).returns
    return AdvantagesReturns(dist_masked_whiten(returns, response_mask, group=group), returns)


def dist_reinforce_pp_baseline_advantages(
    scores: Tensor, response_mask: Tensor, *, group_size: int, group: Group
) -> Tensor:
    """`rlprims.ops.reinforce_pp_baseline_advantages` of the whole batch: r_i − mean_g broadcast over the
    response, whitened over every rank's valid tokens.

    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T].
    """
    centered = drgrpo_advantages(scores, response_mask, group_size=group_size)
    return dist_masked_whiten(centered, response_mask, group=group)


def dist_gpg_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int, group: Group) -> Tensor:
    """`rlprims.ops.gpg_advantages` of the whole batch: A_i = α (r_i − mean_g),
    α = (responses on all ranks) / max(1, responses with a nonzero score on all ranks). One all-reduce.

    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T].
    """
    centered = drgrpo_advantages(scores, response_mask, group_size=group_size)
    counts = torch.stack([torch.tensor(float(scores.shape[0]), dtype=torch.float64, device=scores.device),
                          torch.count_nonzero(scores).to(torch.float64)])
    counts = _all_reduce(counts, dist.ReduceOp.SUM, group)
    alpha = (counts[0] / counts[1].clamp(min=1)).to(scores.dtype)
    return alpha * centered

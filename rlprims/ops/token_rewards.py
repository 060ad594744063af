"""Token-level rewards from one score per response."""

from __future__ import annotations

import torch
from torch import Tensor

from rlprims.ops._validate import check_mask, check_scores, check_tensor

__all__ = ["last_token_rewards"]


def last_token_rewards(scores: Tensor, response_mask: Tensor) -> Tensor:
    """Each response's score on its last valid token, 0 on every other position.

        r_it = s_i if t = max{t' : m_it'} else 0

    verl's reward managers place the scalar reward at the last valid response token; token-level
    estimators (GAE, REINFORCE++) and `kl_in_reward` start from this. A row with no valid token is all 0
    (its score is dropped). The last valid token, not column `length − 1`: holes in the mask are fine.
    Shapes: scores [B] float, response_mask [B, T] bool -> [B, T] in scores' dtype.
    """
    check_tensor("response_mask", response_mask, ndim=2)
    check_scores("scores", scores, batch=response_mask.shape[0])
    check_mask("response_mask", response_mask, response_mask.shape)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if response_mask.shape[1] == 0:
        return zero.expand(response_mask.shape).clone()
    cols = torch.arange(response_mask.shape[1], device=response_mask.device)
    last = torch.where(response_mask, cols, -1).amax(dim=1, keepdim=True)  # -1: no valid token
    return torch.where(response_mask & (cols == last), scores[:, None], zero)

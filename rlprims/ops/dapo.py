"""DAPO's two data-side pieces: the dynamic-sampling group filter and the overlong reward shaping.

The loss-side parts of DAPO (asymmetric clip ε_high > ε_low, token-mean aggregation) live with the
losses and in `reduce.py`. Yu et al. 2025, arXiv:2503.14476.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlprims.ops._validate import check_finite, check_group_size, check_positive, check_scores, check_tensor

__all__ = ["nonzero_variance_group_mask", "overlong_penalty"]


def nonzero_variance_group_mask(scores: Tensor, *, group_size: int) -> Tensor:
    """DAPO dynamic sampling: True for the rows of groups whose scores are not all equal (rows to keep).

    keep_i = [max_{j∈g} r_j ≠ min_{j∈g} r_j]  for group_size ≥ 2;  keep_i = True for group_size = 1.
    A group whose responses all scored the same (all right or all wrong) has zero variance, so every
    group-relative advantage is 0 and it only dilutes the batch; DAPO drops such groups and keeps
    sampling prompts until the batch is full (the loop is the recipe's: filter with
    `scores[keep]`, `batch[keep]`, and top up). Singleton groups are kept, as verl keeps them
    (`std > 0 or len == 1`).
    Yu et al. 2025 (DAPO), arXiv:2503.14476.
    Differs from verl: verl tests `np.std(scores) > 0`, which rounding can make true for equal
    non-representable scores (e.g. three times 0.1); max ≠ min is exact.
    Shapes: scores [B] float -> [B] bool.
    """
    check_scores("scores", scores)
    n = check_group_size(scores.shape[0], group_size)
    if n == 1:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    grouped = scores.reshape(-1, n)
    varied = grouped.amax(dim=-1) != grouped.amin(dim=-1)
    return varied.repeat_interleave(n)


def overlong_penalty(
    response_lengths: Tensor,
    *,
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float,
) -> Tensor:
    """DAPO soft overlong punishment, a reward term to add to each response's score.

    With L the response length, Lmax = max_response_length, b = overlong_buffer_len,
    f = penalty_factor:
        penalty = min(−(L − (Lmax − b)) / b · f, 0)    for L ≤ Lmax
                                                       (0 up to Lmax − b, then linear down to −f at Lmax)
        penalty = −f                                    for L > Lmax
    Yu et al. 2025 (DAPO), arXiv:2503.14476 (the paper's f = 1); verl's DAPO
    reward manager computes the same for L ≤ Lmax.
    Differs from verl: verl keeps extrapolating the line below −f when L > Lmax (it never generates
    more than Lmax tokens, so it never happens there); here such lengths get the paper's −f.
    Shapes: response_lengths [B] (int or float, ≥ 0) -> [B] float (the input's dtype when floating,
    else the default dtype).
    """
    check_tensor("response_lengths", response_lengths, ndim=1)
    if response_lengths.dtype == torch.bool or response_lengths.is_complex():
        raise ValueError(
            f"response_lengths must be an int or float tensor, got dtype {response_lengths.dtype}"
        )
    for name, value in (
        ("max_response_length", max_response_length),
        ("overlong_buffer_len", overlong_buffer_len),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if overlong_buffer_len > max_response_length:
        raise ValueError(
            f"overlong_buffer_len={overlong_buffer_len} must be <= max_response_length={max_response_length}"
        )
    factor = check_positive("penalty_factor", penalty_factor, allow_zero=True)

    dtype = response_lengths.dtype if response_lengths.is_floating_point() else torch.get_default_dtype()
    lengths = response_lengths.to(dtype)
    check_finite("response_lengths", lengths)
    if bool((lengths < 0).any()):
        raise ValueError(f"response_lengths must be >= 0, got min {float(lengths.min())}")

    exceed = lengths - (max_response_length - overlong_buffer_len)
    # clamp to [-1, 0] then scale: min(x·f, 0) for f ≥ 0, floored at −f (L > Lmax).
    # "+ 0.0" turns −0.0 into 0.0.
    return (-exceed / overlong_buffer_len).clamp(min=-1.0, max=0.0) * factor + 0.0

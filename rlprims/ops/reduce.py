"""Masked statistics and loss aggregation.

Masked statistics ignore the values under a False mask completely (they are selected away with
`torch.where`, never multiplied by 0, so NaN or inf in padding cannot leak into the result).

Aggregation turns a per-token loss `[B, T]` into the scalar whose gradient you accumulate. The
normalizer is always an explicit argument: pass the total over the *whole optimizer step* (all
micro-batches, all data-parallel ranks), then sum the gradients of the micro-batch losses. That gives
exactly the gradient of one big batch, however it was split. verl's legacy actor normalized each
micro-batch by its own token count and divided by the accumulation count, which weights tokens of short
micro-batches more; these functions make that mistake impossible to make silently.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlprims.ops._validate import check_mask, check_tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "LossNormalizers",
    "loss_normalizers",
    "aggregate_token_mean",
    "aggregate_seq_mean_token_sum",
    "aggregate_seq_mean_token_mean",
    "aggregate_seq_mean_token_sum_norm",
]


def _check(values: Tensor, mask: Tensor) -> None:
    check_tensor("values", values, floating=True)
    check_mask("mask", mask, values.shape)


def masked_sum(values: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """Sum of `values` where `mask` is True.  S = Σ m·x  (masked entries contribute exactly 0).

    Shapes: values [...], mask [...] bool (same shape) -> scalar, or `values` reduced over `dim`.
    """
    _check(values, mask)
    selected = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is True.  μ = Σ m·x / Σ m.

    An empty selection gives 0 (not NaN): verl divides by Σm + 1e-8, which also gives 0.
    Shapes: values [...], mask [...] bool -> scalar, or reduced over `dim`.
    """
    total = masked_sum(values, mask, dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(values.dtype)


def masked_var(values: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance of the selected values.  σ² = Σ m (x − μ)² / (Σm − 1)   (unbiased, the default, as verl).

    Fewer than two selected values (one value with `unbiased`, zero without) give variance 0, where
    verl raises: a single-token batch then whitens to 0 instead of crashing a run.
    Shapes: values [...], mask [...] bool -> scalar.
    """
    mean = masked_mean(values, mask)
    sq = masked_sum((values - mean) ** 2, mask)
    count = mask.sum().to(values.dtype)
    denom = count - 1 if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whitened values.  w = (x − μ) / sqrt(σ² + eps), μ and unbiased σ² over the selected values.

    With `shift_mean=False` the mean is added back: w = (x − μ)/sqrt(σ²+eps) + μ (verl's option).
    Positions under a False mask are returned as 0. eps = 1e-8 as in verl (inside the sqrt).
    Shapes: values [...], mask [...] bool -> same shape as values.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    safe = torch.where(mask, values, mean)
    out = (safe - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)


class LossNormalizers(NamedTuple):
    """Counts to sum across micro-batches and ranks before aggregating (0-dim int64 tensors)."""

    num_tokens: Tensor  # Σ m: valid tokens
    num_seqs: Tensor  # sequences with at least one valid token


def loss_normalizers(mask: Tensor) -> LossNormalizers:
    """The local counts behind every aggregation mode.

    Sum them over all micro-batches of the optimizer step (and all-reduce over data-parallel ranks)
    and pass the totals to the `aggregate_*` functions. A sequence with no valid token is not counted
    in `num_seqs` (it contributes nothing to any loss either).
    Shapes: mask [B, T] bool -> two 0-dim tensors.
    """
    check_tensor("mask", mask, ndim=2)
    check_mask("mask", mask, mask.shape)
    return LossNormalizers(num_tokens=mask.sum(), num_seqs=mask.any(dim=-1).sum())


def _check_norm(name: str, norm: float | Tensor) -> None:
    if isinstance(norm, Tensor) and norm.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(norm.shape)}")
    value = float(norm.detach()) if isinstance(norm, Tensor) else norm
    # inf is refused too: it would silently turn the loss (and the gradient) into 0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ValueError(
            f"{name} must be a positive number (the total over the optimizer step), got {norm!r}"
        )


def aggregate_token_mean(loss: Tensor, mask: Tensor, *, num_tokens: float | Tensor) -> Tensor:
    """Token-mean:  L = Σ_{i,t} m_it ℓ_it / N_tok.

    `num_tokens` is N_tok of the whole optimizer step, not of this micro-batch.
    DAPO (arXiv:2503.14476) argues for token-mean; it is verl's default `loss_agg_mode`.
    Shapes: loss [B, T], mask [B, T] bool -> scalar.
    """
    _check(loss, mask)
    _check_norm("num_tokens", num_tokens)
    return masked_sum(loss, mask) / num_tokens


def aggregate_seq_mean_token_sum(loss: Tensor, mask: Tensor, *, num_seqs: float | Tensor) -> Tensor:
    """Seq-mean-token-sum:  L = Σ_i (Σ_t m_it ℓ_it) / B.

    `num_seqs` is B of the whole optimizer step.
    Shapes: loss [B, T], mask [B, T] bool -> scalar.
    """
    _check(loss, mask)
    _check_norm("num_seqs", num_seqs)
    return masked_sum(loss, mask) / num_seqs


def aggregate_seq_mean_token_mean(loss: Tensor, mask: Tensor, *, num_seqs: float | Tensor) -> Tensor:
    """Seq-mean-token-mean (the original GRPO objective):  L = Σ_i [Σ_t m_it ℓ_it / Σ_t m_it] / B.

    A row with no valid token contributes 0. `num_seqs` is B of the whole optimizer step.
    Shao et al. 2024 (GRPO), arXiv:2402.03300.
    Shapes: loss [B, T], mask [B, T] bool -> scalar.
    """
    _check(loss, mask)
    _check_norm("num_seqs", num_seqs)
    if loss.dim() != 2:
        raise ValueError(f"loss must be [B, T], got shape {tuple(loss.shape)}")
    per_seq = masked_mean(loss, mask, dim=-1)
    return per_seq.sum() / num_seqs


def aggregate_seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, *, norm: float | Tensor) -> Tensor:
    """Seq-mean-token-sum-norm (Dr.GRPO):  L = Σ_{i,t} m_it ℓ_it / C,  C a constant.

    Liu et al. 2025 (Dr.GRPO), arXiv:2503.20783, divide each response's token sum by a fixed
    maximum length and average over responses, i.e. C = B_step · L_max: pass
    `norm = num_seqs * max_response_length` for that. Differs from verl: verl's default C is the
    padded response length of the batch, which makes the loss scale depend on how the batch was
    padded; here C is whatever constant you pass, and the recipes pass B_step · L_max.
    Shapes: loss [B, T], mask [B, T] bool -> scalar.
    """
    _check(loss, mask)
    _check_norm("norm", norm)
    return masked_sum(loss, mask) / norm

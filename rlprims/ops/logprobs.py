"""Per-token log-probs and entropy straight from final hidden states, chunked over tokens.

The LM head of a 150k-vocabulary model turns N tokens into N·V fp32 logits: 10 GB for 16k tokens. Here
the logits exist only for `chunk_size` tokens at a time, in the forward *and* in the backward (a
`torch.autograd.Function` that recomputes each chunk's logits from the saved hidden states and weight),
so peak extra memory is ≈ 4 · chunk_size · V · 4 bytes (chunk_size = 1024, V = 152k: ≈ 2.5 GB) instead
of O(N·V), and the gradients are exact (the same math as autograd through the materialized logits).

This is the reference for `rlprims.kernels`: a fused kernel has exactly these signatures and must match
these values and gradients.

Which function: `logprobs_from_hidden` when no entropy is needed (old/ref log-probs, a loss without
entropy bonus) — it skips the entropy reduction and its gradient terms; `logprobs_and_entropy` when the
entropy is logged or enters the loss (entropy bonus: its gradient is supported and exact).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlprims.ops._validate import check_positive, check_tensor

__all__ = ["DEFAULT_CHUNK_SIZE", "LogprobsEntropy", "logprobs_and_entropy", "logprobs_from_hidden"]

# Tokens per chunk. Memory of one chunk ≈ 4 · chunk_size · V · 4 bytes (logits, probabilities, two
# temporaries); 1024 tokens × 152k vocab ≈ 2.5 GB.
DEFAULT_CHUNK_SIZE = 1024


class LogprobsEntropy(NamedTuple):
    logprobs: Tensor  # [N] fp32 (fp64 for fp64 inputs), log π(target), ≤ 0
    entropy: Tensor  # [N] fp32 (fp64 for fp64 inputs), H(π(· | context)), ≥ 0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """h Wᵀ in the input dtype (as the model's LM head computes it); /τ in fp32 (skipped for τ = 1).

    The fp32 upcast otherwise happens inside (log_)softmax(dtype=fp32), which casts first: the same
    values as `.float()` followed by the op, one pass over [chunk, V] fewer.
    """
    logits = hidden @ weight.t()
    if temperature != 1.0:
        logits = logits.to(_acc_dtype(hidden.dtype)).div_(temperature)
    return logits


class _ChunkedLogprobs(torch.autograd.Function):
    """z = (h Wᵀ)/τ per chunk; outputs log p_y = z_y − lse(z) and optionally H = −Σ_j p_j log p_j."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):  # type: ignore[override]
        n = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        logprobs = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            # log_softmax = z − max − log Σ exp(z − max) ≤ 0 exactly in floating point
            logp = torch.log_softmax(_logits(hidden[s:e], weight, temperature), dim=-1, dtype=acc)
            logprobs[s:e] = logp.gather(1, targets[s:e, None]).squeeze(1)
            if with_entropy:
                # Σ_j p_j · (−log p_j): every term is ≥ 0, so the entropy is ≥ 0 even after rounding
                # (lse − Σ p z can come out at −1e-7 for a near one-hot distribution).
                entropy[s:e] = (logp.exp() * logp.neg()).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, targets, entropy if with_entropy else logprobs)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        hidden, weight, targets, entropy = ctx.saved_tensors
        grad_lp = grads[0]
        grad_ent = grads[1] if ctx.with_entropy else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_lp is None and grad_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        n = hidden.shape[0]
        tau = ctx.temperature
        acc = _acc_dtype(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        # ∂ log p_y / ∂z_j = 1[j = y] − p_j;   ∂H/∂z_j = −p_j (log p_j + H);   ∂z/∂(h Wᵀ) = 1/τ.
        g_lp = None if grad_lp is None else grad_lp.to(acc) / tau
        g_ent = None if grad_ent is None else grad_ent.to(acc) / tau
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            logits = _logits(h, weight, tau)
            if g_ent is None:
                # dz = −p · g_lp (+ g_lp at the target)
                dz = torch.softmax(logits, dim=-1, dtype=acc).mul_(g_lp[s:e, None].neg())
            else:
                logp = torch.log_softmax(logits, dim=-1, dtype=acc)
                p = logp.exp()
                # dz = −p · (g_lp + g_ent (log p + H))   (+ g_lp at the target)
                inner = logp.add_(entropy[s:e, None]).mul_(g_ent[s:e, None])
                if g_lp is not None:
                    inner.add_(g_lp[s:e, None])
                dz = inner.mul_(p).neg_()
            if g_lp is not None:
                dz.scatter_add_(1, targets[s:e, None], g_lp[s:e, None])
            dz = dz.to(hidden.dtype)  # the cast autograd would apply at the `.float()` boundary
            if need_h:
                grad_hidden[s:e] = dz @ weight
            if need_w:
                grad_weight += (dz.t() @ h).to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _check_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_size: int,
    check_targets: bool = True,
) -> None:
    check_tensor("hidden", hidden, ndim=2, floating=True)
    check_tensor("lm_head_weight", weight, ndim=2, floating=True)
    check_tensor("targets", targets, ndim=1)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden is [N, H] = {tuple(hidden.shape)} but lm_head_weight is [V, H] = {tuple(weight.shape)}; "
            "the hidden sizes must match"
        )
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(
            f"hidden ({hidden.dtype}, {hidden.device}) and lm_head_weight ({weight.dtype}, {weight.device}) "
            "must share dtype and device"
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but hidden has N = {hidden.shape[0]} rows"
        )
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != hidden.device:
        raise ValueError(
            f"targets must be an int64/int32 tensor on {hidden.device}, "
            f"got {targets.dtype} on {targets.device}"
        )
    if check_targets and targets.numel() > 0:  # a wait for the device on CUDA
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets must lie in [0, V={weight.shape[0]}), got values in [{lo}, {hi}]")
    check_positive("temperature", temperature)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def logprobs_and_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_targets: bool = True,
) -> LogprobsEntropy:
    """Log-prob of each target token and the entropy of each next-token distribution, chunked.

    z_n = (h_n Wᵀ) / τ  (matmul in the input dtype, then fp32, or fp64 for fp64 inputs);
    log π(y_n) = z_{n,y_n} − logsumexp(z_n);
    H_n = −Σ_v π_v log π_v = Σ_v π_v (logsumexp(z_n) − z_{n,v}).
    Both come from the tempered distribution, as in verl (logits divided by the rollout temperature before
    log_softmax and entropy). Gradients (exact, recomputed per chunk) flow to `hidden` and
    `lm_head_weight`, from both outputs: ∂log π_y/∂z = onehot(y) − π, ∂H/∂z = −π ⊙ (log π + H).
    Never holds more than `chunk_size` rows of logits (see module docstring for memory). The weight
    gradient is summed over chunks in fp32 and cast to the weight's dtype once; otherwise the results do
    not depend on chunk_size. The backward casts ∂L/∂(h Wᵀ) to the input dtype before its two matmuls,
    as autograd through `(h @ W.T).float()` would.
    The LM head must have no bias and no logit scaling/soft-capping (fold those in before calling).
    Shapes: hidden [N, H], lm_head_weight [V, H] (same dtype), targets [N] int64 in [0, V)
            -> LogprobsEntropy(logprobs [N] fp32, entropy [N] fp32). N = 0 is allowed.
    check_targets=False skips the check that targets lie in [0, V) (on CUDA it waits for the device),
    for callers that checked them on the host (`rlprims.models.packed` does); out-of-range targets are
    then undefined behaviour.
    """
    _check_inputs(hidden, lm_head_weight, targets, temperature, chunk_size, check_targets)
    lp, ent = _ChunkedLogprobs.apply(
        hidden, lm_head_weight, targets.long(), float(temperature), chunk_size, True
    )
    return LogprobsEntropy(logprobs=lp, entropy=ent)


def logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_targets: bool = True,
) -> Tensor:
    """Log-prob of each target token, chunked (`logprobs_and_entropy` without the entropy).

    z_n = (h_n Wᵀ) / τ;  log π(y_n) = z_{n,y_n} − logsumexp(z_n).  Exact gradients to hidden and weight.
    Use it for old-policy / reference log-probs and for losses without an entropy bonus: it saves the
    entropy reduction in the forward and its terms in the backward.
    Shapes: hidden [N, H], lm_head_weight [V, H], targets [N] int64 -> logprobs [N] fp32.
    """
    _check_inputs(hidden, lm_head_weight, targets, temperature, chunk_size, check_targets)
    return _ChunkedLogprobs.apply(
        hidden, lm_head_weight, targets.long(), float(temperature), chunk_size, False
    )

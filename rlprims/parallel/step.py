"""One optimizer step over the micro-batches of a mini-batch: what every trainer loop does the same way."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from rlprims.parallel.guard import guard_init, guard_update

__all__ = ["optimizer_step"]

P = TypeVar("P")


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: Iterable[P],
    loss_fn: Callable[[P], tuple[Tensor, dict[str, float]]],
    *,
    max_grad_norm: float,
    step: int = -1,
) -> tuple[float, dict[str, float]]:
    """Accumulates the gradient of every micro-batch, clips the global norm, steps and zeroes the gradient.

        for part in parts:  loss, metrics = loss_fn(part);  loss.backward()
        g ← g · min(1, max_grad_norm / ‖g‖)  (all parameters, all ranks: FSDP2's DTensor norm is global)

    loss_fn returns the micro-batch's loss, already divided by the step-wide normalizer (see
    `rlprims.ops.reduce`), and Python-float metrics; the metrics of all parts are summed. Under FSDP2
    every rank must run as many parts (`step_micro_batches` plans them so).

    Non-finite guard: when the summed loss or the gradient norm is NaN or inf on any rank, the gradient
    is dropped and FloatingPointError is raised on every rank, naming `step` (the caller's step number,
    for the message), the tensor and the ranks (`rlprims.parallel.guard`): a NaN never reaches
    `optimizer.step()`, so the weights and the last checkpoint stay finite. One small all-reduce.
    Returns (‖g‖ before clipping, {name: Σ_parts metric}).
    """
    totals: dict[str, float] = defaultdict(float)
    loss_sum = torch.zeros(())
    for part in parts:
        loss, metrics = loss_fn(part)
        loss.backward()
        loss_sum = loss_sum.to(loss.device) + loss.detach()
        for name, value in metrics.items():
            totals[name] += float(value)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    try:
        guard_update(guard_init(), {"loss": loss_sum, "grad_norm": norm}, step=step, max_consecutive_skips=0,
                     device=norm.device)
    except FloatingPointError:
        optimizer.zero_grad(set_to_none=True)
        raise
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item(), dict(totals)

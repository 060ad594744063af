"""Non-finite guard: a NaN or inf loss or gradient norm never reaches `optimizer.step()`.

One NaN log-prob, advantage or value at a valid position makes the loss NaN (rlprims.ops.losses
documents it), the gradients NaN, and, after one optimizer step, every weight NaN; the next checkpoint
would save them. The guard is checked between `clip_grad_norm_` and `optimizer.step()`:

    guard = guard_init()                                   # once (or GuardState(**extra["guard"]))
    ...
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    guard = guard_update(guard, {"actor/pg_loss": loss_sum, "actor/grad_norm": grad_norm}, step=step,
                         max_consecutive_skips=args.max_nonfinite_skips, device=device)
    if not guard.skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)                  # always: a skipped update's grads are dropped

Every rank takes the same decision (one all-reduce of a few flags), so the ranks' weights never part.
A skipped update is counted (`guard.skipped`, logged as `actor/nonfinite_skips`); more than
`max_consecutive_skips` non-finite updates in a row stop the run with FloatingPointError naming the
step, the tensors and the ranks; `max_consecutive_skips=0` stops at the first. verl's FSDP actor skips
a non-finite gradient norm without a limit; a limit is added here so that a run that has diverged ends
instead of logging NaN forever. The state is a NamedTuple of ints: put `guard._asdict()` in a
checkpoint's extra_state to carry the counts over a resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GuardState", "guard_init", "guard_update"]


class GuardState(NamedTuple):
    """The guard's counts after the latest update; `skip` says whether that update must be skipped."""

    skip: bool  # the latest update had a non-finite value on some rank: do not call optimizer.step()
    in_a_row: int  # consecutive non-finite updates up to and including the latest
    skipped: int  # non-finite updates skipped since the start (resume: restored from extra_state)


def guard_init() -> GuardState:
    """The state before the first update: nothing skipped."""
    return GuardState(skip=False, in_a_row=0, skipped=0)


def guard_update(
    state: GuardState,
    values: Mapping[str, Tensor | float],
    *,
    step: int,
    max_consecutive_skips: int,
    device: torch.device | str = "cpu",
    group: dist.ProcessGroup | None = None,
) -> GuardState:
    """The guard's state after one update whose loss / gradient norm / ... are `values`.

    skip = any value is non-finite (NaN, +-inf) on any rank of `group`; then in_a_row + 1 and
    skipped + 1, else in_a_row = 0. Raises FloatingPointError, naming the step, the non-finite values
    and the ranks that had them, when in_a_row > max_consecutive_skips (0: the first non-finite update
    stops the run). The same on every rank: the flags go through one all-reduce on `device` (a CUDA
    device for NCCL, CPU for gloo); without an initialized process group, or on one rank, none.
    `values`: scalar tensors (DTensors are made full first: `clip_grad_norm_` of FSDP2 returns one) or
    Python numbers; a tensor with more elements counts as non-finite if any element is. One host
    sync per call (the flags), none per value.
    """
    if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
            or max_consecutive_skips < 0:
        raise ValueError(f"max_consecutive_skips must be an int >= 0, got {max_consecutive_skips!r}")
    if not values:
        raise ValueError("values must name at least one tensor to check (e.g. the loss and grad norm)")
    names = list(values)
    flags = torch.stack([_nonfinite(values[n], device) for n in names]).float()  # [K], 1 = non-finite
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    rank = dist.get_rank(group) if distributed else 0
    if distributed:
        by_rank = torch.zeros(dist.get_world_size(group), len(names), device=flags.device)
        by_rank[rank] = flags
        dist.all_reduce(by_rank, op=dist.ReduceOp.SUM, group=group)
    else:
        by_rank = flags[None]
    bad = by_rank.cpu().tolist()  # the one host sync
    ranks_of = {n: [r for r, row in enumerate(bad) if row[k]] for k, n in enumerate(names)}
    if not any(ranks_of.values()):
        return GuardState(skip=False, in_a_row=0, skipped=state.skipped)
    in_a_row = state.in_a_row + 1
    if in_a_row > max_consecutive_skips:
        shown = "; ".join(
            f"{n} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
            + (f" (here {_show(values[n])})" if rank in rs else "")
            for n, rs in ranks_of.items() if rs)
        limit = ("max_consecutive_skips=0 stops at the first" if max_consecutive_skips == 0 else
                 f"{in_a_row} in a row, more than max_consecutive_skips={max_consecutive_skips}")
        raise FloatingPointError(
            f"step {step}: non-finite {shown}; the update was not applied ({limit}). Look for NaN/inf "
            "in this step's rewards, advantages or log-probs, or lower the learning rate."
        )
    return GuardState(skip=True, in_a_row=in_a_row, skipped=state.skipped + 1)


def _nonfinite(value: Tensor | float, device: torch.device | str) -> Tensor:
    if isinstance(value, Tensor):
        if hasattr(value, "full_tensor"):  # a DTensor (e.g. FSDP2's grad norm): its global value
            value = value.full_tensor()
        return ~torch.isfinite(value.detach()).all().to(device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"values must be tensors or real numbers, got {type(value).__name__}")
    return torch.tensor(not torch.isfinite(torch.tensor(float(value))).item(), device=device)


def _show(value: Tensor | float) -> str:
    """This rank's value (as the error's text): a number, or the count of non-finite elements."""
    if isinstance(value, Tensor):
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        if value.numel() == 1:
            return f"{value.item():.4g}"
        return f"tensor with {int((~torch.isfinite(value)).sum())} non-finite of {value.numel()}"
    return f"{float(value):.4g}"

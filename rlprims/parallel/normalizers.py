"""Loss normalizers summed over an optimizer step (every micro-batch, every data-parallel rank), and
scalar reductions for logging."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from rlprims.ops.reduce import LossNormalizers, loss_normalizers


def step_loss_normalizers(
    micro_batch_masks: Sequence[Tensor], *, group: dist.ProcessGroup | None = None
) -> LossNormalizers:
    """Totals of `loss_normalizers` over all micro-batches of this rank, all-reduced over `group`.

    N_tok = Σ_ranks Σ_micro Σ m,  B = Σ_ranks Σ_micro #(rows with a valid token).
    Pass the result to `rlprims.ops.aggregate_*` for every micro-batch loss: the summed gradients then
    equal those of one batch holding the whole step, on one rank (see rlprims.ops.reduce).
    Without an initialized process group (or with `group` of size 1) no communication happens.
    One all-reduce of two int64 numbers, on the masks' device (use a CPU mask with gloo).
    Shapes: each mask [B_k, T_k] bool -> two 0-dim int64 tensors.
    """
    if len(micro_batch_masks) == 0:
        raise ValueError("micro_batch_masks is empty: an optimizer step needs at least one micro-batch")
    counts = [loss_normalizers(m) for m in micro_batch_masks]
    device = micro_batch_masks[0].device
    totals = torch.stack(
        [sum(c.num_tokens.to(device) for c in counts), sum(c.num_seqs.to(device) for c in counts)]
    ).to(torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    return LossNormalizers(num_tokens=totals[0], num_seqs=totals[1])


def all_reduce_scalars(
    values: dict[str, float], *, mean: bool, device: torch.device | str = "cpu",
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Each named Python scalar summed (mean=False) or averaged (mean=True) over the ranks of `group`.

    One all-reduce of a float64 vector on `device` (a CUDA device for NCCL, CPU for gloo). Without an
    initialized process group, or on one rank, returns the values unchanged. For logging.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(values)
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if mean:
        t = t / dist.get_world_size(group)
    return dict(zip(values, t.tolist()))


def all_reduce_means_by_name(
    values: dict[str, float], *, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """The mean of each named scalar over the ranks of `group` that have it; ranks may have other names.

    For values only some ranks produce (the extra keys of a reward function's dict results, present
    where a rank's responses returned them): one all_gather_object of the names, then one all-reduce of
    sums and counts in a fixed (sorted) order, so every rank gets the same dict. Without an initialized
    process group, or on one rank, returns the values unchanged. For logging.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(values)
    names: list[list[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, sorted(values), group=group)
    union = sorted({n for rank_names in names for n in rank_names or ()})
    t = torch.tensor([[float(values.get(n, 0.0)), float(n in values)] for n in union] or [[0.0, 0.0]],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return {n: (t[i, 0] / t[i, 1]).item() for i, n in enumerate(union)}

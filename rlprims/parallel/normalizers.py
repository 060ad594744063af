"""Loss normalizers summed over an optimizer step: every micro-batch, every data-parallel rank."""

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

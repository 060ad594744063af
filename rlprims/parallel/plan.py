"""Micro-batch plans that every rank can run in lockstep (FSDP2 runs collectives in every pass)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from rlprims.ops.balance import micro_batch_partition, num_micro_batches


def step_micro_batches(
    seq_lens: Sequence[int], *, max_tokens: int, mini_batches: int = 1, group: dist.ProcessGroup | None = None
) -> list[list[list[int]]]:
    """This rank's rows as mini-batches of token-balanced micro-batches, with the same counts on every rank.

    The B rows are cut into `mini_batches` contiguous mini-batches (one optimizer step each; sizes differ
    by at most one row). Each mini-batch is split by `rlprims.ops.micro_batch_partition` into micro-
    batches of ≤ max_tokens tokens; the number of micro-batches is the largest any rank needs for any of
    its mini-batches (one all-reduce), so all ranks run the same number of forward/backward passes —
    with FSDP2 a rank that ran fewer would leave the others waiting in an all-gather.
    Raises ValueError if a rank would get an empty micro-batch (it has fewer rows in a mini-batch than
    the micro-batch count): give every rank the same number of rows, or a larger max_tokens.
    Returns plan[m][k] = row indices (into the B rows) of micro-batch k of mini-batch m.
    """
    lens = [int(x) for x in seq_lens]
    if isinstance(mini_batches, bool) or not isinstance(mini_batches, int) or mini_batches < 1:
        raise ValueError(f"mini_batches must be a positive int, got {mini_batches!r}")
    if len(lens) < mini_batches:
        raise ValueError(f"{len(lens)} rows cannot form mini_batches={mini_batches} non-empty mini-batches")
    bounds = [len(lens) * m // mini_batches for m in range(mini_batches + 1)]
    minis = [list(range(bounds[m], bounds[m + 1])) for m in range(mini_batches)]
    count = max(num_micro_batches([lens[i] for i in rows], max_tokens=max_tokens) for rows in minis)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = torch.tensor([count], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        count = int(t.item())
    plan = []
    for rows in minis:
        parts = micro_batch_partition([lens[i] for i in rows], max_tokens=max_tokens, min_micro_batches=count)
        if any(not p for p in parts):
            raise ValueError(
                f"a mini-batch of {len(rows)} rows on this rank cannot fill {count} micro-batches (another rank "
                f"needs {count} for max_tokens={max_tokens}): give every rank the same rows, or raise max_tokens"
            )
        plan.append([[rows[j] for j in p] for p in parts])
    return plan

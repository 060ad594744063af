"""The trainer's log-probs of a rollout batch's responses: `rlprims.models.packed` on chosen rows.

Rows are the indices of a micro-batch (from `rlprims.parallel.step_micro_batches`); each call packs
those rows' prompt + response tokens into one stream (`rollout_sequences`) and returns the response
columns, aligned with the batch's `response_ids` / `response_mask` / `rollout_logprobs`.

On a GPU keep a copy of the batch on the CPU (as `generate` returns it) and pass `device="cuda"`: the
rows are then cut and packed on the host without waiting for the device, so the next micro-batch's
forward is queued while the GPU still runs the previous backward. A batch on the GPU works too, at one
wait per call (the copy of its masks to the host).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from rlprims.models.packed import response_logprobs, response_logprobs_and_entropy
from rlprims.ops.logprobs import LogprobsEntropy
from rlprims.rollout.batch import RolloutBatch, rollout_sequences

__all__ = ["rows_logprobs", "rows_logprobs_and_entropy", "batch_logprobs"]


def _rows(batch: RolloutBatch, rows: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=batch.prompt_ids.device)
    seqs = rollout_sequences(batch)
    return seqs.input_ids[idx], seqs.attention_mask[idx], seqs.response_mask[idx]


def rows_logprobs(
    model: nn.Module,
    batch: RolloutBatch,
    rows: Sequence[int],
    *,
    temperature: float,
    share_prefixes: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """log π(response_ids[r, t]) for each row r of `rows` (with gradient), 0 off the response mask.

    `share_prefixes=True`: rows of one prompt (a group's samples) compute the prompt once
    (`rlprims.ops.pack_shared_prefixes`); the same values up to fp summation order, less compute.
    device: where the forward runs and the result lives (default: the batch's device; see the module
    docstring for a CPU batch with a GPU model).
    Shapes: batch with responses [B, R], rows k indices -> [k, R] fp32.
    """
    out = response_logprobs(
        model, *_rows(batch, rows), temperature=temperature, share_prefixes=share_prefixes, device=device
    )
    return out[:, batch.prompt_ids.shape[1] :]


def rows_logprobs_and_entropy(
    model: nn.Module,
    batch: RolloutBatch,
    rows: Sequence[int],
    *,
    temperature: float,
    share_prefixes: bool = False,
    device: torch.device | str | None = None,
) -> LogprobsEntropy:
    """`rows_logprobs` and the entropy of each response token's sampling distribution (both with gradient).

    Shapes: batch with responses [B, R], rows k indices -> LogprobsEntropy([k, R], [k, R]) fp32.
    """
    out = response_logprobs_and_entropy(
        model, *_rows(batch, rows), temperature=temperature, share_prefixes=share_prefixes, device=device
    )
    p = batch.prompt_ids.shape[1]
    return LogprobsEntropy(logprobs=out.logprobs[:, p:], entropy=out.entropy[:, p:])


@torch.no_grad()
def batch_logprobs(
    model: nn.Module,
    batch: RolloutBatch,
    parts: Iterable[Sequence[int]],
    *,
    temperature: float,
    share_prefixes: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """The whole batch's log-probs without gradient (old or reference policy), one forward per part.

    `parts` must cover the rows (e.g. every micro-batch of every mini-batch of a step plan); under FSDP2
    every rank must pass as many parts. Rows in no part stay 0. device: as `rows_logprobs`.
    Shapes: batch with responses [B, R] -> [B, R] fp32.
    """
    where = batch.response_ids.device if device is None else device
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float32, device=where)
    for part in parts:
        out[list(part)] = rows_logprobs(
            model, batch, part, temperature=temperature, share_prefixes=share_prefixes, device=device
        )
    return out

"""Statistics of a batch whose rows are split across ranks: `rlprims.ops.reduce` over the whole group.

Each function equals its single-process counterpart applied to the concatenation of every rank's rows
(tested on gloo against one process). The group is an explicit argument, as torchtitan's
`dist_mean(x, mesh)`:

- a `ProcessGroup`, or a 1-D `DeviceMesh` — with `build_mesh`'s (dp, tp) mesh pass `mesh["dp"]`: the
  ranks of one tensor-parallel group share an engine and hence hold the same rows, and each "dp" group
  holds every row exactly once;
- `None`: the default (world) group when torch.distributed is initialized, else this process alone.

Every rank of the group must call, in the same order. One or two all-reduces of a few float64 numbers
on the tensors' device (CUDA for NCCL, CPU for gloo). Values under a False mask never matter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from rlprims._groups import Group, process_group
from rlprims.ops._validate import check_mask, check_tensor

__all__ = [
    "Group",
    "dist_masked_mean",
    "dist_masked_var",
    "dist_masked_whiten",
    "dist_masked_max",
    "dist_masked_min",
    "dist_mean_max_min",
    "dist_cat_rows",
    "dist_batch_metrics",
]

def _all_reduce(t: Tensor, op: dist.ReduceOp, group: Group) -> Tensor:
    pg = process_group(group)
    if pg is not None:
        dist.all_reduce(t, op=op, group=pg)
    return t


def _check(values: Tensor, mask: Tensor) -> None:
    check_tensor("values", values, floating=True)
    check_mask("mask", mask, values.shape)


def _sum_count(values: Tensor, mask: Tensor, group: Group) -> Tensor:
    """[Σ m·x, Σ m] over the group, float64."""
    x = torch.where(mask, values.double(), 0.0)
    return _all_reduce(torch.stack([x.sum(), mask.sum().double()]), dist.ReduceOp.SUM, group)


def dist_masked_mean(values: Tensor, mask: Tensor, *, group: Group) -> Tensor:
    """Masked mean over every rank's valid entries:  μ = Σ_ranks Σ m·x / Σ_ranks Σ m  (0 if none).

    = `rlprims.ops.masked_mean` of all ranks' rows together; not the mean of per-rank means (ranks
    hold different numbers of valid tokens). One all-reduce.
    Shapes: values [...] float, mask [...] bool -> 0-dim, values' dtype.
    """
    _check(values, mask)
    s = _sum_count(values, mask, group)
    return (s[0] / s[1].clamp(min=1)).to(values.dtype)


def _mean_var(values: Tensor, mask: Tensor, group: Group, unbiased: bool) -> tuple[Tensor, Tensor]:
    s = _sum_count(values, mask, group)
    count = s[1]
    mean = s[0] / count.clamp(min=1)
    dev = torch.where(mask, values.double() - mean, 0.0)
    sq = _all_reduce(dev.square().sum().reshape(1), dist.ReduceOp.SUM, group)[0]
    denom = count - 1 if unbiased else count
    var = torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))
    return mean, var


def dist_masked_var(values: Tensor, mask: Tensor, *, group: Group, unbiased: bool = True) -> Tensor:
    """Masked variance over every rank's valid entries:  σ² = Σ m (x − μ)² / (N − 1)  (unbiased, as verl).

    μ from `dist_masked_mean`; two passes (mean, then squared deviations), so no cancellation.
    Fewer than two valid entries in the whole group give 0, as `rlprims.ops.masked_var`. Two all-reduces.
    Shapes: values [...] float, mask [...] bool -> 0-dim, values' dtype.
    """
    _check(values, mask)
    return _mean_var(values, mask, group, unbiased)[1].to(values.dtype)


def dist_masked_whiten(
    values: Tensor, mask: Tensor, *, group: Group, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Whitened with the whole group's statistics:  w = (x − μ) / sqrt(σ² + eps), 0 under a False mask.

    μ and unbiased σ² over all ranks' valid entries (`dist_masked_var`); `shift_mean=False` adds μ back.
    = `rlprims.ops.masked_whiten` of all ranks' rows together: verl whitens the whole batch on its driver
    (GAE, REINFORCE++), which per-rank whitening would not reproduce. Two all-reduces, float64 inside.
    Shapes: values [...] float, mask [...] bool -> values' shape and dtype.
    """
    _check(values, mask)
    mean, var = _mean_var(values, mask, group, unbiased=True)
    out = (values.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0).to(values.dtype)


def _extremes(values: Tensor, mask: Tensor) -> Tensor:
    """[max x, max −x, any valid] locally, float64 (−inf where no entry is valid)."""
    x = values.double()
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=values.device)
    hi = torch.where(mask, x, neg_inf).amax() if x.numel() else neg_inf
    lo = torch.where(mask, -x, neg_inf).amax() if x.numel() else neg_inf
    return torch.stack([hi, lo, mask.any().double()])


def _finish_extremes(ext: Tensor) -> tuple[Tensor, Tensor]:
    """(max, min) from all-reduced `_extremes`; 0 and 0 when no rank had a valid entry."""
    valid = ext[2] > 0
    return torch.where(valid, ext[0], 0.0), torch.where(valid, -ext[1], 0.0)


def dist_masked_max(values: Tensor, mask: Tensor, *, group: Group) -> Tensor:
    """Largest valid entry over every rank (0 if no rank has one). One all-reduce (MAX).

    The mean over ranks of each rank's max is not this (and is not even a value of the batch).
    Shapes: values [...] float, mask [...] bool -> 0-dim, values' dtype.
    """
    _check(values, mask)
    ext = _all_reduce(_extremes(values, mask), dist.ReduceOp.MAX, group)
    return _finish_extremes(ext)[0].to(values.dtype)


def dist_masked_min(values: Tensor, mask: Tensor, *, group: Group) -> Tensor:
    """Smallest valid entry over every rank (0 if no rank has one). One all-reduce (MAX of −x).

    Shapes: values [...] float, mask [...] bool -> 0-dim, values' dtype.
    """
    _check(values, mask)
    ext = _all_reduce(_extremes(values, mask), dist.ReduceOp.MAX, group)
    return _finish_extremes(ext)[1].to(values.dtype)


def dist_mean_max_min(named: Mapping[str, tuple[Tensor, Tensor]], *, group: Group) -> dict[str, float]:
    """verl's `<name>/mean`, `<name>/max`, `<name>/min` of each (values, mask) over every rank's valid
    entries, for logging: {"critic/score": (scores, rows), "critic/advantages": (adv, response_mask)}.

    Each triple equals (`dist_masked_mean`, `dist_masked_max`, `dist_masked_min`); all of them together
    take two all-reduces (a SUM of sums and counts, a MAX of the extremes). No valid entry: 0, 0, 0.
    Shapes: each values [...] float with its mask [...] bool (any shapes, one device) -> Python floats.
    """
    if not named:
        return {}
    sums, exts = [], []
    for name, (values, mask) in named.items():
        try:
            _check(values, mask)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        x = torch.where(mask, values.double(), 0.0)
        sums.append(torch.stack([x.sum(), mask.sum().double()]))
        exts.append(_extremes(values, mask))
    s = _all_reduce(torch.stack(sums), dist.ReduceOp.SUM, group).tolist()
    e = _all_reduce(torch.stack(exts), dist.ReduceOp.MAX, group)
    out: dict[str, float] = {}
    for i, name in enumerate(named):
        hi, lo = _finish_extremes(e[i])
        out[f"{name}/mean"] = s[i][0] / max(s[i][1], 1.0)
        out[f"{name}/max"] = hi.item()
        out[f"{name}/min"] = lo.item()
    return out


def dist_cat_rows(t: Tensor, *, group: Group) -> Tensor:
    """Every rank's rows of `t`, concatenated in rank order, trailing dims padded to the widest rank's.

    For statistics that are not sums (rollout-correction metrics, quantiles) computed on the whole batch
    exactly as one process would: pass the masks through it too (padding is 0 / False, outside every
    mask). Two all-gathers (shapes, then data); bool tensors travel as uint8.
    Shapes: [B_r, *dims] on rank r -> [Σ_r B_r, *max_r dims] (the same on every rank).
    """
    pg = process_group(group)
    if pg is None:
        return t
    world = dist.get_world_size(pg)
    shape = torch.tensor(t.shape, dtype=torch.long, device=t.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=pg)
    sizes = torch.stack(shapes).amax(dim=0).tolist()
    data = t.to(torch.uint8) if t.dtype == torch.bool else t
    padded = data.new_zeros(sizes)
    padded[tuple(slice(0, n) for n in t.shape)] = data
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=pg)
    out = torch.cat([p[: int(s[0])] for p, s in zip(parts, shapes)])
    return out.bool() if t.dtype == torch.bool else out


def dist_batch_metrics(
    scores: Tensor,
    rewards: Tensor,
    advantages: Tensor,
    advantage_mask: Tensor,
    response_lengths: Tensor,
    row_mask: Tensor | None = None,
    *,
    max_response_len: int,
    group: Group,
) -> dict[str, float]:
    """verl's data metrics of a rollout batch over every rank's rows (its `compute_data_metrics`):

      critic/score/{mean,max,min}        the reward function's scores            (per response)
      critic/rewards/{mean,max,min}      the rewards the advantages came from    (per response)
      critic/advantages/{mean,max,min}   over the tokens of `advantage_mask`
      response_length/{mean,max,min}     tokens per response
      response_length/clip_ratio         fraction of responses with max_response_len tokens (cut)
    Max and min are over all ranks' values (not means of per-rank extremes). Two all-reduces.
    row_mask: the responses to count (e.g. DAPO's kept groups); None = all.
    Shapes: scores, rewards, response_lengths, row_mask [B]; advantages [B, T] float, advantage_mask
    [B, T] bool.
    """
    lengths = response_lengths.double()
    rows = torch.ones_like(lengths, dtype=torch.bool) if row_mask is None else row_mask
    cut = (lengths >= max_response_len).double()
    named = {"critic/score": (scores, rows), "critic/rewards": (rewards, rows),
             "critic/advantages": (advantages, advantage_mask), "response_length": (lengths, rows),
             "response_length/clip": (cut, rows)}
    out = dist_mean_max_min(named, group=group)
    out["response_length/clip_ratio"] = out.pop("response_length/clip/mean")
    del out["response_length/clip/max"], out["response_length/clip/min"]
    return out

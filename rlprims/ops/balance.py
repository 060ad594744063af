"""Balancing ragged batches: micro-batches under a token budget, and data-parallel rank partitions.

Pure Python on sequence lengths; returns index lists. No torch.distributed here: where ranks must
agree (the number of micro-batches), this module computes the local value and the caller all-reduces
it (MAX) and passes it back in; the functions are deterministic, so equal inputs give equal outputs on
every rank.

Partitioning is the Karmarkar–Karp largest differencing method (LDM) for k-way number partitioning,
as in verl (`verl/utils/seqlen_balancing.py`). Cost model for ranks: w(L) = a·L + L² — a dense
transformer spends ≈ 12·h²·L FLOPs per layer in its linear layers and ≈ 2·h·L² in attention, so
w ∝ 6h·L + L²; verl calibrates a = 24576 = 6·4096 for a 7B model (h = 4096). Pass a = 6·hidden_size
for your model.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "VERL_LINEAR_COEFF",
    "karmarkar_karp_partition",
    "micro_batch_partition",
    "num_micro_batches",
    "partition_sums",
    "rank_partition",
    "sequence_workloads",
]

# verl's `calculate_workload`: 24576·L + L² (6·hidden_size with hidden_size = 4096, a 7B model).
VERL_LINEAR_COEFF = 24576


def _as_int_list(name: str, values: object) -> list[int]:
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        out = [int(v) for v in values.tolist()]
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        out = list(values)
        for i, v in enumerate(out):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}[{i}] must be an int, got {v!r}")
    else:
        raise ValueError(
            f"{name} must be a list of ints or a 1-D integer tensor, got {type(values).__name__}"
        )
    for i, v in enumerate(out):
        if v < 0:
            raise ValueError(f"{name}[{i}] must be >= 0, got {v}")
    return out


def _check_count(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def sequence_workloads(
    seq_lens: Sequence[int] | Tensor, *, linear_coeff: int = VERL_LINEAR_COEFF
) -> list[int]:
    """Relative compute cost of each sequence:  w(L) = a·L + L²  (exact Python ints).

    a = `linear_coeff` ≈ 6·hidden_size (linear-layer FLOPs relative to attention FLOPs); verl uses 24576.
    Shapes: seq_lens [B] -> list of B ints.
    """
    lens = _as_int_list("seq_lens", seq_lens)
    _check_count("linear_coeff", linear_coeff, minimum=0)
    return [linear_coeff * n + n * n for n in lens]


def karmarkar_karp_partition(
    workloads: Sequence[int] | Tensor, *, num_parts: int, equal_size: bool
) -> list[list[int]]:
    """Split item indices into `num_parts` groups with near-equal workload sums (largest differencing).

    Karmarkar & Karp 1982, "The differencing method of set partitioning" (k-way LDM): every item starts
    as a k-tuple of sets (itself + k−1 empty sets); repeatedly take the two tuples with the largest spread
    (max set sum − min set sum) and merge them, pairing the heaviest set of one with the lightest of the
    other, until one tuple is left. With `equal_size`, items are sorted and seeded k at a time, one per set,
    so every group gets exactly n/k items (n must be divisible by k).
    Deterministic: items are ordered by (workload, index), ties between tuples by creation order.
    Groups come back heaviest first (ties: smallest first index), indices ascending within a group; with
    num_parts > n (and not equal_size) the surplus groups are empty.
    Shapes: workloads [n] ints -> num_parts lists of indices, each index in exactly one list.
    """
    loads = _as_int_list("workloads", workloads)
    k = _check_count("num_parts", num_parts)
    n = len(loads)
    if equal_size and n % k != 0:
        raise ValueError(f"equal_size needs the number of items ({n}) divisible by num_parts ({k})")
    order = sorted(range(n), key=lambda i: (loads[i], i))

    # A tuple is a list of k [sum, items] sets kept sorted heaviest first.
    counter = 0
    heap: list[tuple[int, int, int, list[list]]] = []

    def push(sets: list[list]) -> None:
        nonlocal counter
        sets.sort(key=lambda s: (-s[0], s[1][0] if s[1] else n))
        spread = sets[0][0] - sets[-1][0]
        heapq.heappush(heap, (-spread, -sets[0][0], counter, sets))
        counter += 1

    if equal_size:
        for start in range(0, n, k):
            push([[loads[i], [i]] for i in order[start : start + k]])
    else:
        for i in order:
            push([[loads[i], [i]]] + [[0, []] for _ in range(k - 1)])
    if not heap:  # no items
        return [[] for _ in range(k)]
    while len(heap) > 1:
        a = heapq.heappop(heap)[3]
        b = heapq.heappop(heap)[3]
        # heaviest of a with lightest of b (both lists are sorted heaviest first)
        for j in range(k):
            a[j][0] += b[k - 1 - j][0]
            a[j][1].extend(b[k - 1 - j][1])
        push(a)
    final = heap[0][3]
    parts = [sorted(items) for _, items in final]
    sums = [s for s, _ in final]
    ranked = sorted(range(k), key=lambda j: (-sums[j], parts[j][0] if parts[j] else n))
    return [parts[j] for j in ranked]


def partition_sums(values: Sequence[int] | Tensor, parts: Sequence[Sequence[int]]) -> list[int]:
    """Σ of `values` over each part (e.g. tokens or workload per micro-batch / rank), for logging balance.

    Shapes: values [n], parts k lists of indices -> k ints.
    """
    vals = _as_int_list("values", values)
    return [sum(vals[i] for i in part) for part in parts]


def _refine_by_swaps(loads: list[int], parts: list[list[int]]) -> list[list[int]]:
    """Swap one item between the heaviest and the lightest part while that narrows their gap.

    Sizes are preserved. A swap with 0 < w_a − w_b < gap strictly lowers Σ_parts sum², so this stops;
    each step picks the pair whose new gap |gap − 2(w_a − w_b)| is smallest (ties: smallest indices).
    """
    parts = [list(p) for p in parts]
    k = len(parts)
    sums = partition_sums(loads, parts)
    for _ in range(4 * len(loads) + 1):
        hi = max(range(k), key=lambda j: (sums[j], -j))
        lo = min(range(k), key=lambda j: (sums[j], j))
        gap = sums[hi] - sums[lo]
        if gap <= 0:
            break
        light = sorted((loads[b], b) for b in parts[lo])
        light_loads = [x for x, _ in light]
        best = None
        for a in parts[hi]:
            # want w_b as close as possible to w_a − gap/2, with w_a − gap < w_b < w_a
            target = loads[a] * 2 - gap
            pos = bisect.bisect_left(light_loads, target // 2)
            for q in (pos - 1, pos, pos + 1):
                if 0 <= q < len(light):
                    wb, b = light[q]
                    d = loads[a] - wb
                    if 0 < d < gap:
                        cand = (abs(gap - 2 * d), a, b)
                        if best is None or cand < best:
                            best = cand
        if best is None:
            break
        _, a, b = best
        parts[hi].remove(a)
        parts[lo].remove(b)
        parts[hi].append(b)
        parts[lo].append(a)
        sums[hi] += loads[b] - loads[a]
        sums[lo] += loads[a] - loads[b]
    order = sorted(range(k), key=lambda j: (-sums[j], min(parts[j]) if parts[j] else len(loads)))
    return [sorted(parts[j]) for j in order]


def rank_partition(
    seq_lens: Sequence[int] | Tensor, *, num_ranks: int, linear_coeff: int = VERL_LINEAR_COEFF
) -> list[list[int]]:
    """Assign sequences to data-parallel ranks with balanced compute (verl's `_balance_batch`).

    Karmarkar–Karp (equal_size) on w(L) = a·L + L²: every rank gets exactly B / num_ranks sequences and
    near-equal Σ w. Rank r takes the sequences in `parts[r]` (indices ascending). Every rank computes the
    same result from the same lengths, so this runs redundantly on all ranks with no communication.
    GRPO groups may be split across ranks: compute advantages before partitioning.
    Differs from verl: the Karmarkar–Karp result is refined by swapping single sequences between the
    heaviest and the lightest rank while that narrows their gap (equal sizes kept). On a skewed mix
    (1/8 of 2–4k-token sequences among 16–128-token ones, 256 over 8 ranks) this takes the max/min
    workload ratio from 1.053 (Karmarkar–Karp alone) to 1.0001.
    Shapes: seq_lens [B] ints (B divisible by num_ranks) -> num_ranks lists of B/num_ranks indices.
    """
    workloads = sequence_workloads(seq_lens, linear_coeff=linear_coeff)
    _check_count("num_ranks", num_ranks)
    if len(workloads) % num_ranks != 0:
        raise ValueError(
            f"the batch size B={len(workloads)} must be divisible by num_ranks={num_ranks} "
            "(every rank gets the same number of sequences)"
        )
    parts = karmarkar_karp_partition(workloads, num_parts=num_ranks, equal_size=True)
    return _refine_by_swaps(workloads, parts)


def _check_budget(lens: list[int], max_tokens: object) -> int:
    budget = _check_count("max_tokens", max_tokens)
    for i, n in enumerate(lens):
        if n > budget:
            raise ValueError(
                f"sequence {i} has length {n} > max_tokens={budget}; it cannot fit in any micro-batch "
                "(raise max_tokens to at least the longest sequence)"
            )
    return budget


def _fits(lens: list[int], parts: list[list[int]], budget: int) -> bool:
    return all(sum(lens[i] for i in part) <= budget for part in parts)


def _local_count(lens: list[int], budget: int) -> int:
    k = max(1, math.ceil(sum(lens) / budget))
    # The balanced split of k = ceil(Σ/budget) groups can overflow (bin packing is harder than the
    # bound); add groups until it fits. Terminates: with k = n every sequence is alone and fits.
    while not _fits(lens, karmarkar_karp_partition(lens, num_parts=k, equal_size=False), budget):
        k += 1
    return k


def num_micro_batches(seq_lens: Sequence[int] | Tensor, *, max_tokens: int) -> int:
    """The number of micro-batches this rank needs: the smallest k ≥ ⌈Σ L / max_tokens⌉ that fits.

    verl's dynamic batch size uses k = ⌈Σ L / max_tokens⌉ and lets a micro-batch exceed the budget;
    here k grows until every micro-batch of the Karmarkar–Karp split holds ≤ max_tokens tokens.
    For data parallelism all-reduce k with MAX across ranks and pass it to `micro_batch_partition` as
    `min_micro_batches`, so every rank runs the same number of forward/backward passes.
    A sequence longer than max_tokens raises ValueError naming its index and length.
    Shapes: seq_lens [B] ints -> int (1 for an empty list).
    """
    lens = _as_int_list("seq_lens", seq_lens)
    budget = _check_budget(lens, max_tokens)
    return _local_count(lens, budget)


def micro_batch_partition(
    seq_lens: Sequence[int] | Tensor, *, max_tokens: int, min_micro_batches: int = 1
) -> list[list[int]]:
    """Split a rank's sequences into micro-batches of ≤ max_tokens tokens each, balanced by token count.

    k = max(num_micro_batches(seq_lens), min_micro_batches) micro-batches, from Karmarkar–Karp on the
    token counts L (each micro-batch's Σ L near Σ L / k). If the balanced k-way split overflows the
    budget (possible but rare for k above the local minimum), the fitting split of the local minimum is
    refined by halving (balanced 2-way split) its largest micro-batch until there are k.
    If k > B some micro-batches are empty (run them as no-ops, but still join any collective).
    Differs from verl: verl balances the a·L + L² workload across micro-batches and can exceed the
    budget; micro-batches of one rank run one after another, so only the peak memory (∝ tokens) matters
    here, and the budget is a guarantee. Order: largest token count first.
    Shapes: seq_lens [B] ints -> k lists of indices (ascending), each index in exactly one list.
    """
    lens = _as_int_list("seq_lens", seq_lens)
    budget = _check_budget(lens, max_tokens)
    _check_count("min_micro_batches", min_micro_batches)
    local = _local_count(lens, budget)
    k = max(local, min_micro_batches)
    parts = karmarkar_karp_partition(lens, num_parts=k, equal_size=False)
    if not _fits(lens, parts, budget):
        parts = karmarkar_karp_partition(lens, num_parts=local, equal_size=False)
        while len(parts) < k:
            sums = partition_sums(lens, parts)
            splittable = [j for j in range(len(parts)) if len(parts[j]) > 1]
            if not splittable:
                parts.append([])
                continue
            j = max(splittable, key=lambda j: (sums[j], -j))
            members = parts.pop(j)
            halves = karmarkar_karp_partition([lens[i] for i in members], num_parts=2, equal_size=False)
            parts.extend([[members[i] for i in half] for half in halves])
    sums = partition_sums(lens, parts)
    ranked = sorted(range(len(parts)), key=lambda j: (-sums[j], parts[j][0] if parts[j] else len(lens)))
    return [sorted(parts[j]) for j in ranked]

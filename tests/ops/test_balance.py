import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprims.ops import balance
from rlprims.ops.balance import (
    VERL_LINEAR_COEFF,
    karmarkar_karp_partition,
    micro_batch_partition,
    num_micro_batches,
    partition_sums,
    rank_partition,
    sequence_workloads,
)


def _flat(parts):
    return sorted(i for part in parts for i in part)


def test_workloads_literal():
    # 24576 * 2 + 2² = 49156; a = 10: 10 * 3 + 9 = 39
    assert sequence_workloads([2], linear_coeff=VERL_LINEAR_COEFF) == [49156]
    assert sequence_workloads(torch.tensor([0, 3]), linear_coeff=10) == [0, 39]


def test_karmarkar_karp_literal_two_way():
    # LDM on {8, 7, 6, 5, 4}: 8−7 → 1, 6−5 → 1, then {4, 1, 1}: 4−1 → 3, 3−1 → 2: sums 16 / 14
    # (not the optimum 15 / 15: LDM is a heuristic). 16 = 7 + 5 + 4 (indices 1, 3, 4), 14 = 8 + 6.
    parts = karmarkar_karp_partition([8, 7, 6, 5, 4], num_parts=2, equal_size=False)
    assert parts == [[1, 3, 4], [0, 2]]


def test_karmarkar_karp_literal_equal_size():
    # sorted 3,4,5 | 6,7,8 seed two 3-tuples; merging pairs 8+3, 7+4, 6+5 = 11 each
    parts = karmarkar_karp_partition([8, 7, 6, 5, 4, 3], num_parts=3, equal_size=True)
    assert parts == [[0, 5], [1, 4], [2, 3]]
    assert partition_sums([8, 7, 6, 5, 4, 3], parts) == [11, 11, 11]


def test_more_parts_than_items_and_no_items():
    assert karmarkar_karp_partition([5, 3], num_parts=3, equal_size=False) == [[0], [1], []]
    assert karmarkar_karp_partition([], num_parts=2, equal_size=False) == [[], []]


@given(
    st.lists(st.integers(0, 2000), min_size=1, max_size=40),
    st.integers(1, 6),
    st.booleans(),
)
def test_partition_properties(loads, k, equal_size):
    if equal_size:
        loads = loads[: len(loads) - len(loads) % k] or [1] * k
    parts = karmarkar_karp_partition(loads, num_parts=k, equal_size=equal_size)
    assert len(parts) == k
    assert _flat(parts) == list(range(len(loads)))  # every item exactly once
    assert all(part == sorted(part) for part in parts)
    if equal_size:
        assert {len(p) for p in parts} == {len(loads) // k}
    # deterministic: identical on every "rank" that calls it with the same input
    assert karmarkar_karp_partition(list(loads), num_parts=k, equal_size=equal_size) == parts
    # LDM never leaves a spread larger than the largest item (a single move would reduce it otherwise)
    if not equal_size:
        sums = partition_sums(loads, parts)
        assert max(sums) - min(sums) <= max(loads)


def test_rank_partition_skewed_mix_balance():
    # GRPO-like skewed mix: 7/8 short answers (16..128 tokens), 1/8 long (2048..4096)
    rng = random.Random(0)
    lens = [rng.randint(2048, 4096) if rng.random() < 0.125 else rng.randint(16, 128) for _ in range(256)]
    ranks = 8
    parts = rank_partition(lens, num_ranks=ranks)
    assert _flat(parts) == list(range(256)) and {len(p) for p in parts} == {32}
    w = sequence_workloads(lens)
    ratio = max(partition_sums(w, parts)) / min(partition_sums(w, parts))
    naive = [list(range(r * 32, (r + 1) * 32)) for r in range(ranks)]
    naive_ratio = max(partition_sums(w, naive)) / min(partition_sums(w, naive))
    print(f"rank workload max/min: karmarkar-karp {ratio:.4f}, contiguous split {naive_ratio:.4f}")
    assert ratio < 1.01
    assert naive_ratio > 1.3  # the mix is skewed enough for the bound above to mean something
    assert rank_partition(lens, num_ranks=ranks) == parts


def test_num_micro_batches_literals():
    # ⌈15 / 10⌉ = 2 and {5, 5} | {5} fits
    assert num_micro_batches([5, 5, 5], max_tokens=10) == 2
    # ⌈18 / 10⌉ = 2 (verl's count) but any 2-way split of {6, 6, 6} holds 12 > 10 tokens: 3
    assert num_micro_batches([6, 6, 6], max_tokens=10) == 3
    assert num_micro_batches([], max_tokens=10) == 1


def test_micro_batch_partition_literal_and_forced_count():
    assert micro_batch_partition([5, 5, 5], max_tokens=10) == [[1, 2], [0]]
    # forcing 3 (the all-reduced max of another rank) gives exactly 3
    assert micro_batch_partition([5, 5, 5], max_tokens=10, min_micro_batches=3) == [[0], [1], [2]]
    # more micro-batches than sequences: the surplus are empty
    assert micro_batch_partition([5, 5], max_tokens=10, min_micro_batches=3) == [[0], [1], []]


@given(st.lists(st.integers(1, 100), min_size=1, max_size=30), st.integers(100, 300), st.integers(1, 12))
def test_micro_batch_properties(lens, budget, forced):
    parts = micro_batch_partition(lens, max_tokens=budget, min_micro_batches=forced)
    local = num_micro_batches(lens, max_tokens=budget)
    assert local >= -(-sum(lens) // budget)
    assert len(parts) == max(local, forced)
    assert _flat(parts) == list(range(len(lens)))
    assert all(s <= budget for s in partition_sums(lens, parts))
    assert micro_batch_partition(lens, max_tokens=budget, min_micro_batches=forced) == parts


def test_micro_batch_fallback_when_balanced_split_overflows(monkeypatch):
    # Force the k-way split to overflow (the heuristic gives no monotonicity guarantee) and check that the
    # refinement path still returns exactly k micro-batches within budget.
    real = balance.karmarkar_karp_partition

    def bad_at_four(workloads, *, num_parts, equal_size):
        if num_parts == 4:
            return [list(range(len(workloads))), [], [], []]
        return real(workloads, num_parts=num_parts, equal_size=equal_size)

    monkeypatch.setattr(balance, "karmarkar_karp_partition", bad_at_four)
    lens = [4, 4, 3, 3, 2, 2]  # Σ = 18, budget 10: local count 2
    parts = balance.micro_batch_partition(lens, max_tokens=10, min_micro_batches=4)
    assert len(parts) == 4
    assert _flat(parts) == list(range(6))
    assert all(s <= 10 for s in partition_sums(lens, parts))


def test_bad_inputs():
    with pytest.raises(ValueError, match="sequence 2 has length 11 > max_tokens=10"):
        micro_batch_partition([3, 4, 11], max_tokens=10)
    with pytest.raises(ValueError, match="sequence 0 has length 50"):
        num_micro_batches(torch.tensor([50]), max_tokens=10)
    with pytest.raises(ValueError, match="divisible by num_ranks=4"):
        rank_partition([1, 2, 3], num_ranks=4)
    with pytest.raises(ValueError, match="divisible by num_parts"):
        karmarkar_karp_partition([1, 2, 3], num_parts=2, equal_size=True)
    with pytest.raises(ValueError, match="num_parts must be >= 1"):
        karmarkar_karp_partition([1], num_parts=0, equal_size=False)
    with pytest.raises(ValueError, match=r"workloads\[1\] must be >= 0"):
        karmarkar_karp_partition([1, -2], num_parts=1, equal_size=False)
    with pytest.raises(ValueError, match="must hold integers"):
        num_micro_batches(torch.tensor([1.5]), max_tokens=10)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] must be an int"):
        num_micro_batches([1.0], max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        num_micro_batches([1], max_tokens=0)
    with pytest.raises(ValueError, match="min_micro_batches must be >= 1"):
        micro_batch_partition([1], max_tokens=4, min_micro_batches=0)


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=48), st.integers(1, 6))
def test_rank_partition_properties(lens, ranks):
    lens = lens[: len(lens) - len(lens) % ranks] or [7] * ranks
    parts = rank_partition(lens, num_ranks=ranks)
    assert _flat(parts) == list(range(len(lens)))
    assert {len(p) for p in parts} == {len(lens) // ranks}
    assert rank_partition(list(lens), num_ranks=ranks) == parts
    # the swap refinement never widens the Karmarkar–Karp spread
    w = sequence_workloads(lens)
    kk = partition_sums(w, karmarkar_karp_partition(w, num_parts=ranks, equal_size=True))
    ours = partition_sums(w, parts)
    assert max(ours) - min(ours) <= max(kk) - min(kk)

"""step_micro_batches: every row once, budgets kept, the same micro-batch count on every rank."""

import os
import tempfile

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from rlprims.parallel.plan import step_micro_batches


def test_one_process_literal():
    # 6 rows, 2 mini-batches of rows {0,1,2} and {3,4,5}; budget 10 tokens: {9,1,5} needs 2, {4,4,4} needs 2
    plan = step_micro_batches([9, 1, 5, 4, 4, 4], max_tokens=10, mini_batches=2)
    assert len(plan) == 2 and all(len(mb) == 2 for mb in plan)
    assert sorted(i for mb in plan for part in mb for i in part) == list(range(6))
    assert sorted(map(sorted, plan[0])) == [[0, 1], [2]] or sorted(map(sorted, plan[0])) == [[0], [1, 2]]
    lens = [9, 1, 5, 4, 4, 4]
    assert all(sum(lens[i] for i in part) <= 10 for mb in plan for part in mb)


def test_bad_input():
    with pytest.raises(ValueError, match="mini_batches"):
        step_micro_batches([1, 2], max_tokens=4, mini_batches=0)
    with pytest.raises(ValueError, match="non-empty mini-batches"):
        step_micro_batches([1, 2], max_tokens=4, mini_batches=3)


def _worker(rank, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # rank 0's rows fit one micro-batch, rank 1's need three: both must run three
        lens = [[2, 2, 2, 2], [8, 8, 8, 2]][rank]
        results[rank] = step_micro_batches(lens, max_tokens=10)
        try:
            step_micro_batches([[1, 1], [9, 9, 9]][rank], max_tokens=10)
            results[rank + 2] = "no error"
        except ValueError as e:
            results[rank + 2] = str(e)
    finally:
        dist.destroy_process_group()


def test_two_ranks_same_count():
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(os.path.join(d, "s"), results), nprocs=2, join=True)
        assert len(results[0]) == len(results[1]) == 1
        assert len(results[0][0]) == len(results[1][0]) == 3
        assert "cannot fill 3 micro-batches" in results[2]  # rank 0 has 2 rows for 3 passes

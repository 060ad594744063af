"""Data-parallel gradient == single-process gradient when every micro-batch uses the step normalizers."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlprims.ops.reduce import (
    aggregate_seq_mean_token_mean,
    aggregate_seq_mean_token_sum,
    aggregate_token_mean,
    loss_normalizers,
)
from rlprims.parallel import all_reduce_means_by_name, all_reduce_scalars, step_loss_normalizers
from tests.tolerances import GRAD_SPLIT

WORLD = 2


def _batch():
    g = torch.Generator().manual_seed(0)
    B, T = 12, 9
    theta = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 9, 3, 7, 2, 8, 0, 5, 9, 4, 6, 1])  # row 6 is empty
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return theta, adv, mask


def _loss(theta, adv, mask, agg, norms):
    per_token = -(adv * theta.exp()) + 0.5 * theta**2  # any nonlinear per-token loss
    if agg is aggregate_token_mean:
        return agg(per_token, mask, num_tokens=norms.num_tokens)
    return agg(per_token, mask, num_seqs=norms.num_seqs)


AGGS = [aggregate_token_mean, aggregate_seq_mean_token_sum, aggregate_seq_mean_token_mean]


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    theta, adv, mask = _batch()
    # Uneven split: rank 0 gets rows 0..4 in micro-batches of 2 and 3 rows; rank 1 gets 7 rows in one.
    rows = [[0, 1], [2, 3, 4]] if rank == 0 else [[5, 6, 7, 8, 9, 10, 11]]
    for k, agg in enumerate(AGGS):
        param = theta.clone().requires_grad_(True)
        norms = step_loss_normalizers([mask[r] for r in rows])
        for r in rows:
            _loss(param[r], adv[r], mask[r], agg, norms).backward()
        dist.all_reduce(param.grad)  # DDP/FSDP sum gradients over ranks
        if rank == 0:
            torch.save(param.grad, os.path.join(out_dir, f"grad{k}.pt"))
    summed = all_reduce_scalars({"a": rank + 1.0, "b": 10.0 * rank}, mean=False)
    averaged = all_reduce_scalars({"a": rank + 1.0}, mean=True)
    # names only some ranks have: "b" only on rank 1, "c" only on rank 0
    named = all_reduce_means_by_name({"a": rank + 1.0, "c": 7.0} if rank == 0 else {"b": 4.0, "a": 5.0})
    if rank == 0:
        torch.save((summed, averaged, named), os.path.join(out_dir, "scalars.pt"))
    dist.destroy_process_group()


def test_two_rank_gradient_equals_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        theta, adv, mask = _batch()
        for k, agg in enumerate(AGGS):
            param = theta.clone().requires_grad_(True)
            _loss(param, adv, mask, agg, loss_normalizers(mask)).backward()
            torch.testing.assert_close(torch.load(os.path.join(tmp, f"grad{k}.pt")), param.grad, **GRAD_SPLIT)
        summed, averaged, named = torch.load(os.path.join(tmp, "scalars.pt"))
        assert summed == {"a": 3.0, "b": 10.0} and averaged == {"a": 1.5}
        assert named == {"a": 3.0, "b": 4.0, "c": 7.0}


def test_without_process_group_sums_micro_batches():
    _, _, mask = _batch()
    norms = step_loss_normalizers([mask[:5], mask[5:]])
    assert int(norms.num_tokens) == int(mask.sum())
    assert int(norms.num_seqs) == 11  # the empty row is not a sequence


def test_empty_micro_batch_list_is_an_error():
    with pytest.raises(ValueError, match="micro_batch_masks"):
        step_loss_normalizers([])


def test_all_reduce_scalars_without_process_group_is_identity():
    assert all_reduce_scalars({"x": 2.0}, mean=True) == {"x": 2.0}
    assert all_reduce_means_by_name({"x": 2.0}) == {"x": 2.0}

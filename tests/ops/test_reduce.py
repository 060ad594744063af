import math

import pytest
import torch

from rlprims.ops.losses import gmpo_loss, ppo_clip_loss
from rlprims.ops.reduce import (
    LossNormalizers,
    aggregate_seq_mean_token_mean,
    aggregate_seq_mean_token_sum,
    aggregate_seq_mean_token_sum_norm,
    aggregate_token_mean,
    loss_normalizers,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from tests.tolerances import EXACT, GRAD_SPLIT, REORDER

NAN, INF = float("nan"), float("inf")


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **(tol or EXACT))


# ------------------------------------------------------------------------------ masked statistics
# values at valid positions: 1, 2, 4, 6; padding holds NaN and inf.
VALUES = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, 6.0]])
MASK = torch.tensor([[True, True, False], [True, False, True]])


def test_masked_sum_literal():
    close(masked_sum(VALUES, MASK), 13.0)  # 1 + 2 + 4 + 6
    close(masked_sum(VALUES, MASK, dim=-1), [3.0, 10.0])
    close(masked_sum(VALUES, torch.zeros_like(MASK)), 0.0)


def test_masked_mean_literal():
    close(masked_mean(VALUES, MASK), 13.0 / 4)
    close(masked_mean(VALUES, MASK, dim=-1), [1.5, 5.0])  # 3/2, 10/2
    close(masked_mean(VALUES, MASK, dim=0), [2.5, 2.0, 6.0])  # (1+4)/2, 2/1, 6/1
    close(masked_mean(VALUES, torch.zeros_like(MASK)), 0.0)  # empty -> 0, not NaN
    close(masked_mean(VALUES, MASK & torch.tensor([[True, True, True], [False, False, False]]), dim=-1),
          [1.5, 0.0])


def test_masked_var_literal():
    # mean 3.25; squared deviations 5.0625 + 1.5625 + 0.5625 + 7.5625 = 14.75
    close(masked_var(VALUES, MASK), 14.75 / 3)  # unbiased
    close(masked_var(VALUES, MASK, unbiased=False), 14.75 / 4)
    one = torch.tensor([[True, False, False], [False, False, False]])
    close(masked_var(VALUES, one), 0.0)  # a single value: 0 (verl would raise)
    close(masked_var(VALUES, one, unbiased=False), 0.0)
    close(masked_var(VALUES, torch.zeros_like(MASK)), 0.0)


def test_masked_whiten_literal():
    std = math.sqrt(14.75 / 3 + 1e-8)
    expected = torch.tensor([[1 - 3.25, 2 - 3.25, 0.0], [4 - 3.25, 0.0, 6 - 3.25]]) / std
    close(masked_whiten(VALUES, MASK), expected)
    shifted = torch.where(MASK, expected + 3.25, torch.zeros(()))
    close(masked_whiten(VALUES, MASK, shift_mean=False), shifted)
    w = masked_whiten(VALUES, MASK)
    close(masked_mean(w, MASK), 0.0)
    close(masked_var(w, MASK), 1.0, rtol=1e-5, atol=1e-6)
    # one value: whitened to 0, finite
    one = torch.tensor([[False, True, False], [False, False, False]])
    close(masked_whiten(VALUES, one), torch.zeros(2, 3))


def test_loss_normalizers_literal():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    n = loss_normalizers(mask)
    assert isinstance(n, LossNormalizers)
    assert n.num_tokens.item() == 3 and n.num_seqs.item() == 2  # the empty row is not a sequence
    assert n.num_tokens.dtype == torch.int64 and n.num_tokens.dim() == 0


def test_aggregate_literal():
    loss = torch.tensor([[1.0, 2.0, NAN], [INF, 5.0, 7.0], [3.0, -INF, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    close(aggregate_token_mean(loss, mask, num_tokens=3), 2.0)  # (1 + 2 + 3) / 3
    close(aggregate_seq_mean_token_sum(loss, mask, num_seqs=2), 3.0)  # (3 + 3) / 2
    close(aggregate_seq_mean_token_mean(loss, mask, num_seqs=2), 2.25)  # (3/2 + 3/1) / 2
    close(aggregate_seq_mean_token_sum_norm(loss, mask, norm=2 * 3), 1.0)  # 6 / 6
    # normalizers as tensors, as loss_normalizers returns them
    n = loss_normalizers(mask)
    close(aggregate_token_mean(loss, mask, num_tokens=n.num_tokens), 2.0)
    close(aggregate_seq_mean_token_mean(loss, mask, num_seqs=n.num_seqs), 2.25)


def test_reduce_bad_inputs():
    with pytest.raises(ValueError, match="bool"):
        masked_mean(VALUES, MASK.float())
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        masked_sum(VALUES, MASK[:, :2])
    with pytest.raises(ValueError, match="floating"):
        masked_mean(VALUES.long(), MASK)
    with pytest.raises(ValueError, match="2 dims"):
        loss_normalizers(MASK[0])
    for bad in (0, -1.0, NAN, INF, True, torch.tensor(0), torch.tensor([3, 4])):
        with pytest.raises(ValueError, match="num_tokens"):
            aggregate_token_mean(VALUES, MASK, num_tokens=bad)
    with pytest.raises(ValueError, match="num_seqs"):
        aggregate_seq_mean_token_mean(VALUES, MASK, num_seqs=0)
    with pytest.raises(ValueError, match="norm"):
        aggregate_seq_mean_token_sum_norm(VALUES, MASK, norm=-2)


# ----------------------------------------------------------- gradient invariance across micro-batches
# A batch split into micro-batches (different numbers of rows AND of valid tokens; each micro-batch
# trimmed to its own longest response, as dynamic batching does), each reduced with the normalizer
# of the WHOLE step, gradients accumulated: the gradient must equal the one-batch gradient.

B, T_MAX = 16, 12
SPLITS = {
    1: [16],
    2: [5, 11],
    4: [1, 3, 5, 7],
    8: [1, 1, 2, 1, 3, 2, 4, 2],
}


def _batch():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(B, T_MAX, generator=g) * 3
    logprobs = old + 0.4 * torch.randn(B, T_MAX, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T_MAX).contiguous()
    lengths = torch.randint(1, T_MAX + 1, (B,), generator=g)
    lengths[6] = 0  # one empty row: counted by neither normalizer
    mask = torch.arange(T_MAX)[None, :] < lengths[:, None]
    # padding holds garbage, which must not matter
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, NAN))
    return logprobs, old, adv, mask


MODES = {
    "token_mean": lambda loss, m, n: aggregate_token_mean(loss, m, num_tokens=n.num_tokens),
    "seq_mean_token_sum": lambda loss, m, n: aggregate_seq_mean_token_sum(loss, m, num_seqs=n.num_seqs),
    "seq_mean_token_mean": lambda loss, m, n: aggregate_seq_mean_token_mean(loss, m, num_seqs=n.num_seqs),
    # Dr.GRPO: a constant C = B_step · L_max (fixed maximum response length, not the padded length)
    "seq_mean_token_sum_norm": lambda loss, m, n: aggregate_seq_mean_token_sum_norm(
        loss, m, norm=n.num_seqs * T_MAX
    ),
}

LOSSES = {
    "ppo_clip": lambda lp, old, adv, m: ppo_clip_loss(
        lp, old, adv, m, clip_low=0.2, clip_high=0.28, clip_dual=3.0
    ),
    # sequence-level loss (every token depends on its whole row)
    "gmpo": lambda lp, old, adv, m: gmpo_loss(lp, old, adv, m, clip_low=0.4, clip_high=0.4),
}


def _micro_batches(n_micro):
    start = 0
    for size in SPLITS[n_micro]:
        yield slice(start, start + size)
        start += size
    assert start == B


def _accumulated_grad(loss_fn, mode, n_micro, *, per_micro_batch_norm=False):
    """Sum of micro-batch gradients, each micro-batch loss reduced with the step's normalizers.

    With per_micro_batch_norm, reproduce verl's legacy actor instead: each micro-batch normalized by its
    own counts, then divided by the number of micro-batches.
    """
    logprobs, old, adv, mask = _batch()
    leaf = logprobs.clone().requires_grad_(True)
    micro = []
    for rows in _micro_batches(n_micro):
        t = max(int(mask[rows].sum(-1).max()), 1)  # trim padding: token counts and widths differ
        micro.append((rows, t))
    # the step's normalizers: local counts summed over the micro-batches (all-reduced over ranks too)
    parts = [loss_normalizers(mask[rows, :t]) for rows, t in micro]
    step = LossNormalizers(sum(p.num_tokens for p in parts), sum(p.num_seqs for p in parts))
    assert step == loss_normalizers(mask)
    total = torch.zeros(())
    for (rows, t), local in zip(micro, parts):
        m = mask[rows, :t]
        out = loss_fn(leaf[rows, :t], old[rows, :t], adv[rows, :t], m)
        if per_micro_batch_norm:
            norms = LossNormalizers(local.num_tokens, local.num_seqs.clamp(min=1))
            value = MODES[mode](out.loss, m, norms) / n_micro
        else:
            value = MODES[mode](out.loss, m, step)
        value.backward()
        total = total + value.detach()
    assert leaf.grad is not None
    return leaf.grad, total


def _assert_same_grad(grad, ref):
    torch.testing.assert_close(grad, ref, **GRAD_SPLIT)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n_micro", [2, 4, 8])
def test_gradient_invariant_to_micro_batching(loss_name, mode, n_micro):
    ref_grad, ref_loss = _accumulated_grad(LOSSES[loss_name], mode, 1)
    grad, loss = _accumulated_grad(LOSSES[loss_name], mode, n_micro)
    assert torch.isfinite(ref_grad).all() and ref_grad.abs().sum() > 0
    _assert_same_grad(grad, ref_grad)
    torch.testing.assert_close(loss, ref_loss, **REORDER)


def test_micro_batches_have_different_token_counts():
    # the invariance test above would be vacuous if the micro-batches were alike
    _, _, _, mask = _batch()
    for n_micro in (2, 4, 8):
        counts = [int(mask[rows].sum()) for rows in _micro_batches(n_micro)]
        widths = [int(mask[rows].sum(-1).max()) for rows in _micro_batches(n_micro)]
        assert len(set(counts)) > 1 and len(set(widths)) > 1


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("n_micro", [2, 4, 8])
def test_per_micro_batch_normalization_changes_gradient(mode, n_micro):
    # verl's legacy bug: normalize each micro-batch by its own counts, divide by the accumulation count.
    # The gradient then differs from the one-batch gradient, and the check above catches it.
    ref_grad, _ = _accumulated_grad(LOSSES["ppo_clip"], mode, 1)
    bad_grad, _ = _accumulated_grad(LOSSES["ppo_clip"], mode, n_micro, per_micro_batch_norm=True)
    rel = (bad_grad - ref_grad).abs().max() / ref_grad.abs().max()
    assert rel > 1e-2
    with pytest.raises(AssertionError):
        _assert_same_grad(bad_grad, ref_grad)

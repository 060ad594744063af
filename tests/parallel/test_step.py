"""optimizer_step: the summed micro-batch gradients, clipped, give the one-batch update."""

import torch

from rlprims.parallel.step import optimizer_step
from tests.tolerances import GRAD_SPLIT


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, dtype=torch.float64)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    return model, x, y


def test_micro_batches_equal_one_batch_and_metrics_add_up():
    model, x, y = _setup()
    ref = torch.nn.Linear(4, 1, dtype=torch.float64)
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))

    def loss_fn(rows):
        loss = ((model(x[rows]) - y[rows]) ** 2).sum() / len(x)  # divided by the step's total
        return loss, {"loss": loss.item(), "rows": len(rows)}

    norm, sums = optimizer_step(model, opt, [[0, 1, 2], [3], [4, 5, 6, 7, 8, 9]], loss_fn, max_grad_norm=0.5)
    full = ((ref(x) - y) ** 2).mean()
    full.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert abs(norm - ref_norm.item()) < 1e-12 and norm > 0.5  # the clip bound
    assert abs(sums["loss"] - full.item()) < 1e-12 and sums["rows"] == 10
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **GRAD_SPLIT)
        assert a.grad is None  # zeroed for the next step


def test_non_finite_loss_or_gradient_never_reaches_the_optimizer():
    import pytest

    for bad in (float("nan"), float("inf")):
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.tensor([[1.0, 2.0, bad]])

        def loss_fn(part):
            return model(x).sum() * part, {"loss": 1.0}

        with pytest.raises(FloatingPointError, match=r"step 7: non-finite (loss|grad_norm)"):
            optimizer_step(model, optimizer, [1.0, 2.0], loss_fn, max_grad_norm=1.0, step=7)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
        assert not optimizer.state and all(p.grad is None for p in model.parameters())  # nothing applied

"""rlprims.parallel.guard: a non-finite loss or gradient norm never reaches optimizer.step(). Literal state
sequences, the error text, a NaN injected into a real training step (weights and optimizer state stay
untouched, the next finite step applies), and 2 gloo ranks taking the same decision when one rank's
loss is NaN."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlprims.parallel.guard import GuardState, guard_init, guard_update

NAN, INF = float("nan"), float("inf")


def _update(state, loss, norm, *, step=1, limit=3):
    return guard_update(state, {"actor/pg_loss": loss, "actor/grad_norm": norm}, step=step,
                        max_consecutive_skips=limit)


def test_literal_sequence_counts_and_resets():
    s = guard_init()
    assert s == GuardState(skip=False, in_a_row=0, skipped=0)
    s = _update(s, torch.tensor(0.5), torch.tensor(1.0))
    assert s == GuardState(False, 0, 0)
    s = _update(s, torch.tensor(NAN), torch.tensor(1.0))
    assert s == GuardState(True, 1, 1)
    s = _update(s, 0.5, INF)  # Python floats work too; inf counts as non-finite
    assert s == GuardState(True, 2, 2)
    s = _update(s, 0.5, torch.tensor(2.0))  # a finite update resets the run of bad ones
    assert s == GuardState(False, 0, 2)
    s = _update(s, torch.tensor([1.0, -INF]), 1.0)  # any element of a larger tensor
    assert s == GuardState(True, 1, 3)
    assert GuardState(**s._asdict()) == s  # round-trips through a checkpoint's extra_state (JSON)
    assert json.loads(json.dumps(s._asdict())) == {"skip": True, "in_a_row": 1, "skipped": 3}


def test_stops_after_max_consecutive_skips_naming_step_and_values():
    s = guard_init()
    for step in (4, 5):
        s = _update(s, NAN, NAN, step=step, limit=2)
    with pytest.raises(FloatingPointError, match=r"step 6: non-finite actor/grad_norm on rank 0 \(here inf\); "
                                                 r"the update was not applied \(3 in a row, more than "
                                                 r"max_consecutive_skips=2\)"):
        _update(s, 0.25, INF, step=6, limit=2)
    with pytest.raises(FloatingPointError, match=r"step 9: non-finite actor/pg_loss on rank 0 \(here nan\); "
                                                 r"actor/grad_norm .*max_consecutive_skips=0 stops at the first"):
        _update(guard_init(), NAN, NAN, step=9, limit=0)


@pytest.mark.parametrize("kw, match", [
    ({"max_consecutive_skips": -1}, "max_consecutive_skips"),
    ({"max_consecutive_skips": True}, "max_consecutive_skips"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        guard_update(guard_init(), {"loss": 1.0}, step=1, **kw)
    with pytest.raises(ValueError, match="at least one"):
        guard_update(guard_init(), {}, step=1, max_consecutive_skips=1)
    with pytest.raises(ValueError, match="str"):
        guard_update(guard_init(), {"loss": "nan"}, step=1, max_consecutive_skips=1)


def _train_step(model, optimizer, guard, advantages, step):
    """One policy-gradient-like step as a recipe writes it, with the guard between clip and step."""
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    loss = -(model(x).squeeze(-1) * advantages).mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    guard = guard_update(guard, {"actor/pg_loss": loss.detach(), "actor/grad_norm": grad_norm}, step=step,
                         max_consecutive_skips=1)
    if not guard.skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return guard


def test_injected_nan_never_reaches_the_weights_or_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard = _train_step(model, optimizer, guard_init(), torch.tensor([1.0, NAN, -1.0, 0.5]), step=1)
    assert guard == GuardState(True, 1, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing applied
    assert optimizer.state_dict()["state"] == {}  # not even AdamW's step count moved
    assert all(p.grad is None for p in model.parameters())  # the NaN gradient is gone
    guard = _train_step(model, optimizer, guard, torch.tensor([1.0, 0.0, -1.0, 0.5]), step=2)
    assert guard == GuardState(False, 0, 1)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not torch.equal(before["weight"], model.weight)  # the finite step applied
    with pytest.raises(FloatingPointError, match="step 4"):  # two NaN updates in a row > limit 1
        for step in (3, 4):
            guard = _train_step(model, optimizer, guard, torch.full((4,), NAN), step=step)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        loss = torch.tensor(NAN if rank == 1 else 0.5)  # only rank 1's batch is bad
        norm = torch.tensor(1.0)  # say its gradient never met the others' (the loss alone must decide)
        state = guard_update(guard_init(), {"actor/pg_loss": loss, "actor/grad_norm": norm}, step=3,
                             max_consecutive_skips=1)
        clean = guard_update(state, {"actor/pg_loss": torch.tensor(0.5), "actor/grad_norm": norm}, step=4,
                             max_consecutive_skips=1)
        try:
            guard_update(guard_init(), {"actor/pg_loss": loss, "actor/grad_norm": norm}, step=5,
                         max_consecutive_skips=0)
            error = None
        except FloatingPointError as e:
            error = str(e)
        Path(out, f"r{rank}.json").write_text(json.dumps({"state": state, "clean": clean, "error": error}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_same_decision():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [json.loads(Path(tmp, f"r{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["state"] == [True, 1, 1] and r["clean"] == [False, 0, 1]  # rank 0 skips too
    assert results[0]["error"] == ("step 5: non-finite actor/pg_loss on rank 1; the update was not applied "
                                   "(max_consecutive_skips=0 stops at the first). Look for NaN/inf in this "
                                   "step's rewards, advantages or log-probs, or lower the learning rate.")
    assert results[1]["error"].startswith("step 5: non-finite actor/pg_loss on rank 1 (here nan);")

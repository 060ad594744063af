"""generate_multiturn over data-parallel ranks whose engines step together.

vLLM under torchrun with data parallelism all-reduces over the dp group at every engine step, so each
rank must call `sample` as often as its peers, even when its own trajectories are done or it has no
prompt (a recipe run hung for 10 minutes on this, 2026-12-02: rank 1 needed a third round, rank 0 had
moved on to the update). Here `sample` is the scripted one of test_multiturn plus one all-reduce on a
side group with a short timeout, standing in for the engine's lock-step: a rank that skips a round
makes its peer fail within seconds instead of hanging. Each rank's trajectories must equal what it gets
alone (group=None).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("pebble")

# (rank 0's scripts, rank 1's scripts): one trajectory per prompt, n = 1
CASES = {
    "uneven_rounds": (
        [["The answer is 7."]],  # one round
        [["<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"12 * 34\"}}</tool_call>",
          "The answer is 408."]],  # two rounds
    ),
    "empty_rank": ([], [["The answer is 7."], ["The answer is 8."]]),
}


def _worker(rank: int, store: str, model_dir: str, case: str, out: str) -> None:
    from transformers import AutoTokenizer

    from rlprims.rollout import generate_multiturn, tool_pool
    from rlprims.rollout.tools import calculator
    from tests.rollout.test_multiturn import prompt_of, scripted

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scripts = CASES[case][rank]
    prompts = [prompt_of(tokenizer, f"What is {rank} + {i}?") for i in range(len(scripts))]
    kw = dict(n=1, tokenizer=tokenizer, max_turns=3, max_response_tokens=120, max_model_len=400)
    with tool_pool([calculator], timeout_s=5.0, max_output_chars=64, workers=1) as pool:
        alone_sample = scripted(tokenizer, scripts)  # before the process group: this process alone
        alone = generate_multiturn(alone_sample, prompts, pool=pool, **kw)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        try:
            lockstep = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=20))
            inner = scripted(tokenizer, scripts)

            def sample(prompt_ids, **kw):
                dist.all_reduce(torch.zeros(1), group=lockstep)  # the engines' lock-step: every round
                return inner(prompt_ids, **kw)

            together = generate_multiturn(sample, prompts, pool=pool, group=None, **kw)  # the world group
            calls = torch.tensor([len(alone_sample.log), len(inner.log)])
            gathered = [torch.zeros(2, dtype=torch.long) for _ in range(2)]
            dist.all_gather(gathered, calls)
        finally:
            dist.destroy_process_group()
    for a, b in zip(alone.rollout, together.rollout):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(alone.turn_ids, together.turn_ids) and torch.equal(alone.num_turns, together.num_turns)
    if rank == 0:
        torch.save([g.tolist() for g in gathered], out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_samples_every_round(case):
    from rlprims.rollout import default_model_path

    model_dir = str(default_model_path())
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "calls.pt")
        mp.spawn(_worker, args=(os.path.join(d, "store"), model_dir, case, out), nprocs=2, join=True)
        (alone0, together0), (alone1, together1) = torch.load(out)
    rounds = max(len(script) for scripts in CASES[case] for script in scripts)
    assert together0 == together1 == rounds  # in lock-step: each rank sampled once per round
    assert (alone0, alone1) == (max((len(s) for s in CASES[case][0]), default=0),
                                max((len(s) for s in CASES[case][1]), default=0))

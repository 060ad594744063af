"""The pure-PyTorch generator: processed log-probs literals, and generate_hf on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from rlprims.rollout import FINISH_LENGTH, FINISH_STOP, generate_hf, processed_logprobs
from tests.rollout.conftest import EOS_ID, check_layout, forward_logprobs, tiny_engine_prompts
from tests.tolerances import ENGINE_FP32, EXACT

# probabilities 1/10, 2/10, 3/10, 4/10
LOGITS = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def test_processed_logprobs_literals():
    full = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    torch.testing.assert_close(
        processed_logprobs(LOGITS, temperature=1.0, top_k=None, top_p=1.0), full, **EXACT
    )
    # greedy: log_softmax of the raw logits, top-k / top-p ignored (vLLM's convention)
    torch.testing.assert_close(processed_logprobs(LOGITS, temperature=0, top_k=1, top_p=0.1), full, **EXACT)
    # temperature 0.5: logits * 2 -> probabilities proportional to 1, 4, 9, 16 (sum 30)
    t = torch.log(torch.tensor([[1.0, 4.0, 9.0, 16.0]]) / 30)
    torch.testing.assert_close(processed_logprobs(LOGITS, temperature=0.5, top_k=None, top_p=1.0), t, **EXACT)
    inf = float("-inf")
    # top-k 2 keeps 3/10, 4/10 -> renormalized 3/7, 4/7
    k2 = torch.tensor([[inf, inf, math.log(3 / 7), math.log(4 / 7)]])
    torch.testing.assert_close(processed_logprobs(LOGITS, temperature=1.0, top_k=2, top_p=1.0), k2, **EXACT)
    # top-p 0.5: sorted 0.4, 0.3, 0.2, 0.1; mass before each = 0, 0.4, 0.7, 0.9; keep while < 0.5
    # -> the same as k2
    torch.testing.assert_close(
        processed_logprobs(LOGITS, temperature=1.0, top_k=None, top_p=0.5), k2, **EXACT
    )
    # top-p 0.3: only the most likely token (mass before it is 0) -> log 1 = 0
    p3 = torch.tensor([[inf, inf, inf, 0.0]])
    torch.testing.assert_close(
        processed_logprobs(LOGITS, temperature=1.0, top_k=None, top_p=0.3), p3, **EXACT
    )
    # top-k 3 then top-p 0.6: kept 2/9, 3/9, 4/9 -> mass before 0, 4/9, 7/9 -> keep 4/9, 3/9 -> 4/7, 3/7
    torch.testing.assert_close(processed_logprobs(LOGITS, temperature=1.0, top_k=3, top_p=0.6), k2, **EXACT)


def test_generate_hf_layout_and_logprobs_match_forward(tiny_hf_model):
    prompts = tiny_engine_prompts()
    batch = generate_hf(tiny_hf_model, prompts, n=3, temperature=0.8, top_k=40, max_tokens=12, seed=0)
    check_layout(batch, prompts, 3)
    ref = forward_logprobs(tiny_hf_model, batch, temperature=0.8, top_k=40)
    for r, expected in enumerate(ref):
        torch.testing.assert_close(batch.rollout_logprobs[r][batch.response_mask[r]], expected, **ENGINE_FP32)


def test_generate_hf_seed_determinism(tiny_hf_model):
    kw = dict(n=4, temperature=1.0, max_tokens=10)
    a = generate_hf(tiny_hf_model, tiny_engine_prompts(), seed=5, **kw)
    b = generate_hf(tiny_hf_model, tiny_engine_prompts(), seed=5, progress=True, **kw)  # a bar changes nothing
    c = generate_hf(tiny_hf_model, tiny_engine_prompts(), seed=6, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.response_ids, c.response_ids)
    # samples of one prompt differ from each other (each row has its own stream)
    assert len({tuple(a.response_ids[r].tolist()) for r in range(4)}) > 1


def test_generate_hf_batch_invariant_greedy(tiny_hf_model):
    # left padding must not change anything: each prompt alone gives the same greedy tokens
    prompts = tiny_engine_prompts()
    batch = generate_hf(tiny_hf_model, prompts, n=1, temperature=0, max_tokens=16)
    for i, p in enumerate(prompts):
        alone = generate_hf(tiny_hf_model, [p], n=1, temperature=0, max_tokens=16)
        assert alone.response_ids[0].tolist() == batch.response_ids[i][batch.response_mask[i]].tolist()
        torch.testing.assert_close(
            alone.rollout_logprobs[0], batch.rollout_logprobs[i][batch.response_mask[i]], **ENGINE_FP32
        )


def test_generate_hf_pad_id_does_not_matter(tiny_hf_model):
    kw = dict(n=2, temperature=1.0, max_tokens=8, seed=1)
    a = generate_hf(tiny_hf_model, tiny_engine_prompts(), pad_token_id=0, **kw)
    b = generate_hf(tiny_hf_model, tiny_engine_prompts(), pad_token_id=77, **kw)
    assert torch.equal(a.response_ids[a.response_mask], b.response_ids[b.response_mask])
    assert torch.equal(a.prompt_ids[a.prompt_mask], b.prompt_ids[b.prompt_mask])
    assert torch.equal(a.rollout_logprobs, b.rollout_logprobs)
    assert (b.response_ids[~b.response_mask] == 77).all()


def test_generate_hf_stop_tokens(tiny_hf_model):
    prompts = tiny_engine_prompts()
    free = generate_hf(tiny_hf_model, prompts, n=1, temperature=0, max_tokens=8)
    assert (free.finish_reasons == FINISH_LENGTH).all() and (free.response_lengths == 8).all()
    row = free.response_ids[0].tolist()
    k = next(i for i in range(1, 8) if row[i] not in row[:i])  # first new token after position 0
    stopped = generate_hf(tiny_hf_model, prompts, n=1, temperature=0, max_tokens=8, stop_token_ids=[row[k]])
    assert stopped.response_ids[0][: k + 1].tolist() == row[: k + 1]  # stop token kept
    assert stopped.response_lengths[0] == k + 1 and stopped.finish_reasons[0] == FINISH_STOP


def test_generate_hf_eos_from_generation_config(tiny_hf_model, monkeypatch):
    free = generate_hf(tiny_hf_model, [[1, 5]], n=1, temperature=0, max_tokens=8)
    first = int(free.response_ids[0, 0])
    assert first != EOS_ID
    monkeypatch.setattr(tiny_hf_model.generation_config, "eos_token_id", [first])
    out = generate_hf(tiny_hf_model, [[1, 5]], n=1, temperature=0, max_tokens=8)
    assert out.response_ids[0].tolist() == [first] and out.finish_reasons.tolist() == [FINISH_STOP]
    ignored = generate_hf(tiny_hf_model, [[1, 5]], n=1, temperature=0, max_tokens=8, ignore_eos=True)
    assert torch.equal(ignored.response_ids, free.response_ids)


def test_generate_hf_model_length_limit(tiny_hf_model):
    # max_model_len 6: prompt of 5 leaves room for 1 token, prompt of 2 for 4 -> both FINISH_LENGTH
    out = generate_hf(
        tiny_hf_model,
        [[1, 2, 3, 4, 5], [1, 5]],
        n=1,
        temperature=0,
        max_tokens=10,
        max_model_len=6,
        ignore_eos=True,
    )
    assert out.response_lengths.tolist() == [1, 4] and (out.finish_reasons == FINISH_LENGTH).all()
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] has 6 tokens.*max_model_len=6"):
        generate_hf(tiny_hf_model, [[1], [1] * 6], n=1, temperature=0, max_tokens=2, max_model_len=6)


def test_generate_hf_empty_and_mode_restored(tiny_hf_model):
    out = generate_hf(tiny_hf_model, [], n=2, temperature=1.0, max_tokens=4)
    assert out.response_ids.shape == (0, 0)
    tiny_hf_model.train()
    try:
        generate_hf(tiny_hf_model, [[1, 5]], n=1, temperature=0, max_tokens=2)
        assert tiny_hf_model.training
    finally:
        tiny_hf_model.eval()

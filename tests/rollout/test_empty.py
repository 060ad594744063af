"""A rank with no prompts (validation set smaller than the world, a step whose prompts all fell out):
both generators return an empty batch without starting a request, and the batch's helpers return empty
results, so the rank reaches every later collective."""

from __future__ import annotations

import pytest
import torch

from rlprims.rollout import generate_hf, rollout_sequences
from rlprims.rollout.batch import decode_prompts, decode_responses


class _NoTokens:
    def batch_decode(self, ids, skip_special_tokens):
        raise AssertionError("nothing to decode")


def _assert_empty(batch):
    assert batch.prompt_ids.shape == batch.response_ids.shape == batch.rollout_logprobs.shape == (0, 0)
    assert batch.finish_reasons.shape == batch.response_lengths.shape == (0,)
    assert decode_responses(_NoTokens(), batch) == [] and decode_prompts(_NoTokens(), batch) == []
    seqs = rollout_sequences(batch)
    assert seqs.input_ids.shape == (0, 0) and seqs.response_mask.sum() == 0
    assert batch.response_lengths.float().sum().item() == 0  # sums of an empty rank are 0, not NaN


def test_generate_hf_empty(tiny_hf_model):
    _assert_empty(generate_hf(tiny_hf_model, [], n=4, temperature=1.0, max_tokens=8, seed=3))
    _assert_empty(generate_hf(tiny_hf_model, (), n=1, temperature=0.0, max_tokens=8))


def test_generate_empty(tiny_engine):
    from rlprims.rollout import generate

    _assert_empty(generate(tiny_engine, [], n=4, temperature=1.0, max_tokens=8, seed=3))
    _assert_empty(generate(tiny_engine, [], n=1, temperature=0.0, max_tokens=8, progress=True))
    # the engine still works after (nothing was half-submitted)
    assert generate(tiny_engine, [[1, 5]], n=1, temperature=0.0, max_tokens=2).response_ids.shape[0] == 1


def test_empty_still_checks_options(tiny_hf_model):
    with pytest.raises(ValueError, match="n must be"):
        generate_hf(tiny_hf_model, [], n=0, temperature=1.0, max_tokens=8)
    assert torch.is_grad_enabled()

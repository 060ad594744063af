"""RolloutBatch packing and the input checks shared by the generators (no vLLM, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlprims.rollout.batch import (
    FINISH_LENGTH,
    FINISH_STOP,
    check_prompts,
    check_sampling,
    check_token_ids,
    decode_prompts,
    decode_responses,
    empty_rollout,
    pack_rollout,
    rollout_sequences,
)


def test_pack_rollout_literal():
    # 2 prompts x n=2. Prompt 0 = [7, 8] (len 2), prompt 1 = [9] (len 1) -> P = 2, left-padded:
    #   rows 0, 1: [7, 8]       rows 2, 3: [pad, 9]
    # Responses (len 1, 3, 2, 3) -> R = 3, right-padded with pad = -1.
    out = pack_rollout(
        [[7, 8], [9]],
        [[5], [4, 4, 2], [6, 3], [1, 1, 1]],
        [[-0.5], [-1.0, -2.0, -3.0], [-0.25, -0.75], [-1.5, -1.5, -1.5]],
        [FINISH_STOP, FINISH_STOP, FINISH_LENGTH, FINISH_LENGTH],
        n=2,
        pad_token_id=-1,
    )
    assert out.prompt_ids.tolist() == [[7, 8], [7, 8], [-1, 9], [-1, 9]]
    assert out.prompt_mask.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    assert out.response_ids.tolist() == [[5, -1, -1], [4, 4, 2], [6, 3, -1], [1, 1, 1]]
    assert out.response_mask.tolist() == [
        [True, False, False],
        [True, True, True],
        [True, True, False],
        [True, True, True],
    ]
    assert out.rollout_logprobs.tolist() == [
        [-0.5, 0.0, 0.0],
        [-1.0, -2.0, -3.0],
        [-0.25, -0.75, 0.0],
        [-1.5, -1.5, -1.5],
    ]
    assert out.finish_reasons.tolist() == [0, 0, 1, 1]
    assert out.prompt_lengths.tolist() == [2, 2, 1, 1]
    assert out.response_lengths.tolist() == [1, 3, 2, 3]
    assert out.prompt_ids.dtype == out.response_ids.dtype == torch.long
    assert out.rollout_logprobs.dtype == torch.float32
    # identity: masks and lengths agree
    assert torch.equal(out.response_mask.sum(1), out.response_lengths)
    assert torch.equal(out.prompt_mask.sum(1), out.prompt_lengths)


def test_pack_rollout_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="needs 4 rows"):
        pack_rollout([[1], [2]], [[3]], [[0.0]], [0], n=2, pad_token_id=0)


def test_empty_rollout_shapes():
    out = empty_rollout()
    assert out.prompt_ids.shape == out.response_ids.shape == out.rollout_logprobs.shape == (0, 0)
    assert out.response_mask.dtype == torch.bool and out.finish_reasons.shape == (0,)


def test_check_prompts_accepts_lists_tensors_numpy():
    got = check_prompts([[1, 2], torch.tensor([3]), np.array([4, 5])], vocab_size=10, max_model_len=4)
    assert got == [[1, 2], [3], [4, 5]]
    assert check_prompts([], vocab_size=10, max_model_len=4) == []


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[1], []], r"prompt_ids\[1\] is empty"),
        ([[1], [2, 10]], r"prompt_ids\[1\] has token ids outside \[0, 10\): \[10\]"),
        ([[-1]], r"prompt_ids\[0\] has token ids outside"),
        ([[1.5]], r"prompt_ids\[0\] must hold integer token ids"),
        ([[True]], r"prompt_ids\[0\] must hold integer token ids"),
        ([torch.tensor([[1]])], r"prompt_ids\[0\] must be a 1-D integer tensor"),
        ([torch.tensor([1.0])], r"prompt_ids\[0\] must be a 1-D integer tensor"),
        (torch.ones(2, 3, dtype=torch.long), r"sequence of prompts.*shape \(2, 3\)"),
        ("abc", r"sequence of prompts"),
        ([7], r"prompt_ids\[0\] must be a list"),
    ],
)
def test_check_prompts_bad_input(prompts, match):
    with pytest.raises(ValueError, match=match):
        check_prompts(prompts, vocab_size=10, max_model_len=4)


def test_check_prompts_too_long_names_every_index():
    # max_model_len = 4: a prompt may have at most 3 tokens (one response token must fit).
    with pytest.raises(
        ValueError, match=r"prompt_ids\[1\] has 4 tokens; prompt_ids\[3\] has 5 tokens.*max_model_len=4"
    ):
        check_prompts([[1, 2, 3], [1] * 4, [1], [1] * 5], vocab_size=10, max_model_len=4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n=0), "n must be a positive int"),
        (dict(max_tokens=0), "max_tokens must be a positive int"),
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0"),
        (dict(temperature=0.0, n=2), r"greedy\) needs n=1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be None"),
    ],
)
def test_check_sampling_bad_input(kw, match):
    args = dict(n=2, temperature=1.0, max_tokens=4, top_p=1.0, top_k=None) | kw
    with pytest.raises(ValueError, match=match):
        check_sampling(**args)


def test_check_token_ids():
    assert check_token_ids("stop_token_ids", (3, 4)) == [3, 4]
    with pytest.raises(ValueError, match="stop_token_ids must hold non-negative ints"):
        check_token_ids("stop_token_ids", [-1])
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence of ints"):
        check_token_ids("stop_token_ids", 3)  # type: ignore[arg-type]


def _small_batch():
    # prompt 0 = [7, 8], prompt 1 = [9]; n = 1; responses [5] and [6, 3]; pad -1
    return pack_rollout([[7, 8], [9]], [[5], [6, 3]], [[-0.5], [-0.25, -0.75]], [FINISH_STOP, FINISH_LENGTH],
                        n=1, pad_token_id=-1)


def test_rollout_sequences_literal():
    seqs = rollout_sequences(_small_batch())
    assert seqs.input_ids.tolist() == [[7, 8, 5, -1], [-1, 9, 6, 3]]
    assert seqs.attention_mask.tolist() == [[True, True, True, False], [False, True, True, True]]
    assert seqs.response_mask.tolist() == [[False, False, True, False], [False, False, True, True]]


def test_decode_responses_drops_padding():
    class Tok:  # records what it was asked to decode
        def batch_decode(self, ids, skip_special_tokens):
            return [" ".join(map(str, row)) + ("" if skip_special_tokens else "!") for row in ids]

    assert decode_responses(Tok(), _small_batch()) == ["5", "6 3"]
    assert decode_responses(Tok(), _small_batch(), skip_special_tokens=False) == ["5!", "6 3!"]


def test_decode_prompts_drops_padding():
    class Tok:
        def batch_decode(self, ids, skip_special_tokens):
            return [" ".join(map(str, row)) + ("!" if skip_special_tokens else "") for row in ids]

    assert decode_prompts(Tok(), _small_batch()) == ["7 8", "9"]
    assert decode_prompts(Tok(), _small_batch(), skip_special_tokens=True) == ["7 8!", "9!"]


def test_decode_of_an_empty_batch_is_empty(tiny_model_dir):
    """A rank with no prompts (e.g. fewer validation prompts than ranks) decodes nothing, with a real
    tokenizer (whose batch_decode([]) gives [''], one text for no row)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert decode_responses(tokenizer, empty_rollout()) == []
    assert decode_prompts(tokenizer, empty_rollout()) == []
    assert rollout_sequences(empty_rollout()).input_ids.shape == (0, 0)
    one = pack_rollout([[1, 7]], [[9, 2]], [[-0.5, -0.5]], [FINISH_STOP], n=1, pad_token_id=0)
    assert decode_responses(tokenizer, one) == ["<9>"]  # EOS <2> is special
    assert decode_prompts(tokenizer, one) == ["<1> <7>"]

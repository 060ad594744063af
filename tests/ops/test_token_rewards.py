"""last_token_rewards: the score on the last valid token of each row."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprims.ops import last_token_rewards


def test_literal():
    scores = torch.tensor([1.5, -2.0, 3.0, 4.0])
    mask = torch.tensor([[True, True, False], [True, False, True], [False, False, False], [True, True, True]])
    expected = torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    assert torch.equal(last_token_rewards(scores, mask), expected)  # a hole (row 1) is fine; row 2 empty


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_sum_over_tokens_is_the_score_of_every_non_empty_row(lengths):
    lengths = torch.tensor(lengths)
    mask = torch.arange(5)[None, :] < lengths[:, None]
    scores = torch.arange(len(lengths), dtype=torch.float32) + 1
    out = last_token_rewards(scores, mask)
    assert torch.equal(out.sum(-1), torch.where(lengths > 0, scores, 0.0))
    assert torch.equal(out != 0, mask & (torch.arange(5)[None, :] == lengths[:, None] - 1))


def test_bad_input():
    with pytest.raises(ValueError, match="scores"):
        last_token_rewards(torch.zeros(3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="response_mask"):
        last_token_rewards(torch.zeros(2), torch.ones(2, 4))
    assert last_token_rewards(torch.zeros(2), torch.ones(2, 0, dtype=torch.bool)).shape == (2, 0)

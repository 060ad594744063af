"""rl_prompt_sets: the prompts every RL recipe starts from (embedded task or verl parquet)."""

from __future__ import annotations

import pytest

from rlprims.data import arithmetic_rows, rl_prompt_sets, write_verl_parquet


class _Tokenizer:
    """Chat template = the user's text; one token per character (so lengths are easy to reason about)."""

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        return messages[-1]["content"]

    def __call__(self, text, *, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}


def test_embedded_task_and_validation_cap():
    sets = rl_prompt_sets(_Tokenizer(), train_files="", val_files="", val_prompts=5, max_prompt_len=1000,
                          max_operand=9, train_size=20)
    assert (len(sets.train), len(sets.val), sets.train_rows, sets.val_rows) == (20, 5, 20, 5)
    assert sets.train[0][1] == arithmetic_rows(20, seed=0, max_operand=9)[0]
    assert sets.val[0][1] == arithmetic_rows(5, seed=1, max_operand=9, split="test")[0]
    assert "20 of 20 training and 5 of 5 validation prompts fit 1000 tokens" == sets.summary(1000)
    assert rl_prompt_sets(_Tokenizer(), train_files="", val_files="", val_prompts=0, max_prompt_len=1000,
                          max_operand=9, train_size=3).val == []


def test_parquet_files_comma_separated_and_length_filter(tmp_path):
    rows = arithmetic_rows(6, seed=3, max_operand=9)
    rows[0] = {**rows[0], "prompt": [{"role": "user", "content": "x" * 500}]}  # too long
    write_verl_parquet(rows[:3], tmp_path / "a.parquet")
    write_verl_parquet(rows[3:], tmp_path / "b.parquet")
    files = f"{tmp_path / 'a.parquet'},{tmp_path / 'b.parquet'}"
    sets = rl_prompt_sets(_Tokenizer(), train_files=files, val_files=str(tmp_path / "b.parquet"), val_prompts=2,
                          max_prompt_len=200, max_operand=9)
    assert [row for _, row in sets.train] == rows[1:] and sets.train_rows == 6
    assert [row for _, row in sets.val] == rows[3:5]


def test_no_prompt_fits_names_the_flag():
    with pytest.raises(ValueError, match="max-prompt-len"):
        rl_prompt_sets(_Tokenizer(), train_files="", val_files="", val_prompts=1, max_prompt_len=3,
                       max_operand=9, train_size=4)

import pytest

from rlprims.data import (
    arithmetic_rows,
    chat_prompt_ids,
    read_verl_parquet,
    validate_rows,
    write_verl_parquet,
)
from rlprims.rewards import compute_score


def test_arithmetic_rows_are_deterministic_and_correct():
    rows = arithmetic_rows(50, seed=3)
    assert rows == arithmetic_rows(50, seed=3)
    assert rows != arithmetic_rows(50, seed=4)
    for row in rows:
        question = row["prompt"][0]["content"]
        a, op, b = question.removeprefix("What is ").split("?")[0].split()
        assert str(eval(f"{a}{op}{b}")) == row["reward_model"]["ground_truth"]  # noqa: S307 (our ints)
        truth = row["reward_model"]["ground_truth"]
        assert compute_score(row["data_source"], f"The answer is {truth}.", truth) == 1.0


def test_parquet_round_trip(tmp_path):
    rows = arithmetic_rows(5, seed=0)
    path = write_verl_parquet(rows, tmp_path / "train.parquet")
    assert read_verl_parquet(path) == rows
    assert not list(tmp_path.glob(".*.tmp"))


def test_validation_names_row_and_field(tmp_path):
    rows = arithmetic_rows(3, seed=0)
    del rows[2]["reward_model"]
    with pytest.raises(ValueError, match=r"row 2 lacks required field\(s\) \['reward_model'\]"):
        validate_rows(rows)
    rows = arithmetic_rows(2, seed=0)
    rows[1]["prompt"] = "a string, not messages"
    with pytest.raises(ValueError, match="row 1 prompt must be a non-empty list"):
        validate_rows(rows)
    with pytest.raises(ValueError, match="no parquet file"):
        read_verl_parquet(tmp_path / "missing.parquet")


class _Tokenizer:
    """Chat template "<u>content</u><a>" and one token per character: enough to check the plumbing."""

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<u>{m['content']}</u>" for m in messages) + "<a>"

    def __call__(self, text, *, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_chat_prompt_ids_templates_and_drops_overlong():
    rows = arithmetic_rows(3, seed=0)
    rows[1]["prompt"][0]["content"] = "x" * 500
    kept = chat_prompt_ids(_Tokenizer(), rows, max_len=200)
    assert [row for _, row in kept] == [rows[0], rows[2]]
    ids, row = kept[0]
    assert "".join(map(chr, ids)) == f"<u>{row['prompt'][0]['content']}</u><a>"
    with pytest.raises(ValueError, match="max_len"):
        chat_prompt_ids(_Tokenizer(), rows, max_len=0)

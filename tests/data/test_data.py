import pytest

from rlprims.data import arithmetic_rows, read_verl_parquet, validate_rows, write_verl_parquet
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

import pytest

from rlprims.rewards import compute_score, extract_gsm8k_answer, gsm8k_score


@pytest.mark.parametrize(
    ("text", "strict", "expected"),
    [
        ("so 3 + 4 = 7\n#### 7", True, "7"),
        ("#### 1,234", True, "1234"),
        ("#### -5 then #### 6", True, "6"),  # the last marked answer counts
        ("the answer is 7", True, None),  # strict needs the marker
        ("the answer is 7", False, "7"),
        ("3 apples and 12 pears, total 15.", False, "15"),
        ("no number here.", False, None),
    ],
)
def test_extract(text, strict, expected):
    assert extract_gsm8k_answer(text, strict=strict) == expected


def test_only_the_last_300_characters_count():
    text = "#### 9 " + "x" * 400
    assert extract_gsm8k_answer(text, strict=True) is None


def test_score_values():
    assert gsm8k_score("#### 42", "42") == 1.0
    assert gsm8k_score("#### 41", "42", format_score=0.1) == 0.1
    assert gsm8k_score("no answer", "42", format_score=0.1) == 0.0
    assert gsm8k_score("it is 1,000", "1000", strict=False) == 1.0


def test_compute_score_dispatch():
    assert compute_score("openai/gsm8k", "#### 3", "3") == 1.0
    assert compute_score("openai/gsm8k", "3", "3") == 0.0
    assert compute_score("rlprims/arithmetic", "It is -3.", "-3") == 1.0
    with pytest.raises(ValueError, match="no reward function for data_source='mystery'"):
        compute_score("mystery", "1", "1")

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprims.rewards import format_score, load_reward_fn


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7\n#### 7", 1.0),
        ("#### -1,234.5\n", 1.0),
        ("work\n#### 7.", 1.0),
        ("#### 7 and then more words", 0.0),  # the marker must end the response
        ("The answer is 7", 0.0),
        (r"So $\boxed{\frac{1}{2}}$.", 1.0),
        (r"\[ \boxed{x^{2}} \]", 1.0),
        (r"\boxed{}", 0.0),  # empty box
        (r"\boxed{\frac{1}{2}", 0.0),  # unbalanced
        (r"\boxed{3} but I am not sure", 0.0),
        ("", 0.0),
    ],
)
def test_format_literal(text, expected):
    assert format_score(text) == expected


@given(st.integers(-10**6, 10**6), st.text(alphabet="abc .,\n", max_size=30))
def test_format_property_a_final_marker_or_box_passes(n, prefix):
    assert format_score(f"{prefix}\n#### {n}") == 1.0
    assert format_score(f"{prefix} \\boxed{{{n}}}") == 1.0
    assert format_score(f"{prefix}\n#### {n} because") == 0.0


def test_load_from_module_and_file(tmp_path):
    fn = load_reward_fn("rlprims.rewards:compute_score")
    assert fn("openai/gsm8k", "#### 3", "3", None) == 1.0
    assert fn(data_source="openai/gsm8k", solution_str="#### 3", ground_truth="3", extra_info=None) == 1.0
    (tmp_path / "my_reward.py").write_text(
        "def compute_score(*, data_source, solution_str, ground_truth, extra_info=None, **kwargs):\n"
        "    return {'score': float(solution_str.strip() == ground_truth), 'src': data_source}\n"
        "helper = 3\n"
    )
    mine = load_reward_fn(f"{tmp_path / 'my_reward.py'}:compute_score")
    # a keyword-only function, called positionally
    assert mine("d", " 5 ", "5", {}) == {"score": 1.0, "src": "d"}
    assert mine.load().__name__ == "compute_score"
    assert mine.spec == f"{tmp_path / 'my_reward.py'}:compute_score"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="must be 'package.module:function'"):
        load_reward_fn("no_colon_here")
    with pytest.raises(ValueError, match="no module 'not_a_module_xyz'"):
        load_reward_fn("not_a_module_xyz:fn")
    with pytest.raises(ValueError, match="no file at"):
        load_reward_fn(f"{tmp_path}/missing.py:fn")
    with pytest.raises(ValueError, match=r"has no 'nope'; its callables: \[.*'compute_score'"):
        load_reward_fn("rlprims.rewards.score:nope")
    (tmp_path / "r.py").write_text("x = 1\ndef two(a, b):\n    return 0\nraise_me = None\n")
    with pytest.raises(ValueError, match="x is a int, not a function"):
        load_reward_fn(f"{tmp_path / 'r.py'}:x")
    with pytest.raises(ValueError, match="two must accept the keyword arguments data_source"):
        load_reward_fn(f"{tmp_path / 'r.py'}:two")
    (tmp_path / "broken.py").write_text("import not_a_module_xyz\n")
    with pytest.raises(ValueError, match="importing .*broken.py failed"):
        load_reward_fn(f"{tmp_path / 'broken.py'}:f")

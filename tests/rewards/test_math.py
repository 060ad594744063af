import threading
import time

import pytest

from rlprims.rewards import compute_score, math_verify_score

# "9^{9^{9^9}}" makes sympy evaluate an astronomically large power: it never finishes on its own.
PATHOLOGICAL = r"The answer is \boxed{9^{9^{9^{9}}}}"


@pytest.mark.parametrize(
    ("solution", "truth", "expected"),
    [
        (r"so the answer is \boxed{\frac{1}{2}}", "0.5", 1.0),  # LaTeX vs decimal
        ("the answer is 0.5", r"\frac{1}{2}", 1.0),  # plain number vs LaTeX ground truth
        (r"$x = \boxed{2\sqrt{2}}$", r"\sqrt{8}", 1.0),  # symbolic equivalence
        (r"\boxed{3}", "4", 0.0),
        ("no answer here", "4", 0.0),
        (r"\boxed{4}", r"\boxed{4}", 1.0),  # a boxed ground truth is not boxed twice
    ],
)
def test_literal_examples(solution, truth, expected):
    assert math_verify_score(solution, truth, timeout_s=5.0) == expected


def test_pathological_answer_is_cut_off_in_the_main_thread():
    start = time.monotonic()
    assert math_verify_score(PATHOLOGICAL, "1", timeout_s=0.5) == 0.0
    assert math_verify_score(PATHOLOGICAL, "1", timeout_s=0.5, timeout_score=-1.0) == -1.0
    assert time.monotonic() - start < 5.0
    # the alarm is gone: a later sleep is not interrupted
    time.sleep(0.2)


def test_time_limit_holds_outside_the_main_thread():
    results = {}

    def work():
        t0 = time.monotonic()
        results["slow"] = math_verify_score(PATHOLOGICAL, "1", timeout_s=0.5)
        results["ok"] = math_verify_score(r"\boxed{\frac{1}{2}}", "0.5", timeout_s=30.0)
        results["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert results["slow"] == 0.0 and results["ok"] == 1.0
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        math_verify_score("1", "1", timeout_s=0)


def test_compute_score_dispatches_math_sources():
    for source in ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500"):
        assert compute_score(source, r"\boxed{\frac{3}{4}}", "0.75") == 1.0
        assert compute_score(source, r"\boxed{1}", "0.75") == 0.0
    with pytest.raises(ValueError, match=r"no reward function for data_source='mystery'.*'HuggingFaceH4/"):
        compute_score("mystery", "1", "1")

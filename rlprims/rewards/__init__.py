"""rlprims.rewards: reward functions with verl's signature.

`compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float` dispatches on
`data_source` the way verl's default reward does; each task's scorer is also importable on its own,
and `load_reward_fn("module:function" or "file.py:function")` loads a user's verl-style function.
"""

from rlprims.rewards.format import format_score
from rlprims.rewards.gsm8k import extract_gsm8k_answer, gsm8k_score
from rlprims.rewards.loading import load_reward_fn
from rlprims.rewards.math import math_verify_score
from rlprims.rewards.score import KNOWN_SOURCES, compute_score, score_responses

__all__ = [
    "KNOWN_SOURCES",
    "compute_score",
    "extract_gsm8k_answer",
    "format_score",
    "gsm8k_score",
    "load_reward_fn",
    "math_verify_score",
    "score_responses",
]

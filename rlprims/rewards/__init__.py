"""rlprims.rewards: reward functions with verl's signature, and scoring them safely.

`compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float` dispatches on
`data_source` the way verl's default reward does; each task's scorer is also importable on its own,
and `load_reward_fn("module:function" or "file.py:function")` loads a user's verl-style function.
`check_reward_sources` finds a data source without a scorer before training; `reward_pool` +
`score_responses` score a batch in worker processes, each call under a time limit (docs/rewards.md).
"""

from rlprims.rewards.format import format_score
from rlprims.rewards.gsm8k import extract_gsm8k_answer, gsm8k_score
from rlprims.rewards.loading import LoadedRewardFn, load_reward_fn
from rlprims.rewards.math import math_verify_score
from rlprims.rewards.pool import DEFAULT_TIMEOUT_S, RewardPool, reward_pool
from rlprims.rewards.score import (KNOWN_SOURCES, RewardResult, check_reward_sources, compute_score,
                                   score_responses)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "KNOWN_SOURCES",
    "LoadedRewardFn",
    "RewardPool",
    "RewardResult",
    "check_reward_sources",
    "compute_score",
    "extract_gsm8k_answer",
    "format_score",
    "gsm8k_score",
    "load_reward_fn",
    "math_verify_score",
    "reward_pool",
    "score_responses",
]

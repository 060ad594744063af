"""rlprims.rewards: reward functions with verl's signature.

`compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float` dispatches on
`data_source` the way verl's default reward does; each task's scorer is also importable on its own.
"""

from rlprims.rewards.gsm8k import extract_gsm8k_answer, gsm8k_score
from rlprims.rewards.score import compute_score

__all__ = ["compute_score", "extract_gsm8k_answer", "gsm8k_score"]

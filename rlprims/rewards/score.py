"""verl's reward-function signature, dispatching on the dataset name."""

from __future__ import annotations

from typing import Any

from rlprims.rewards.gsm8k import gsm8k_score


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None
) -> float:
    """Score one response. `data_source` names the task (the parquet column of the same name).

    - "openai/gsm8k", "gsm8k": strict GSM8K format ("#### <number>"), as verl.
    - "rlprims/arithmetic": the last number in the response (the embedded synthetic task).
    Any other data source raises ValueError listing the known ones: a reward that silently scores 0
    would train on nothing.
    """
    if data_source in ("openai/gsm8k", "gsm8k"):
        return gsm8k_score(solution_str, ground_truth, strict=True)
    if data_source == "rlprims/arithmetic":
        return gsm8k_score(solution_str, ground_truth, strict=False)
    raise ValueError(
        f"no reward function for data_source={data_source!r}; known: 'openai/gsm8k', 'gsm8k', "
        "'rlprims/arithmetic'. Pass your own compute_score to the recipe for other tasks."
    )

"""verl's reward-function signature, dispatching on the dataset name."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rlprims.rewards.gsm8k import gsm8k_score
from rlprims.rewards.math import math_verify_score

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k")
ARITHMETIC_SOURCES = ("rlprims/arithmetic",)
# The MATH datasets verl's default_compute_score sends to its math scorer; here: math-verify.
MATH_SOURCES = ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")
KNOWN_SOURCES = GSM8K_SOURCES + ARITHMETIC_SOURCES + MATH_SOURCES


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    *,
    math_timeout_s: float = 5.0,
) -> float:
    """Score one response. `data_source` names the task (the parquet column of the same name).

    - "openai/gsm8k", "gsm8k": strict GSM8K format ("#### <number>"), as verl.
    - "rlprims/arithmetic": the last number in the response (the embedded synthetic task).
    - "lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500":
      `math_verify_score` with a `math_timeout_s` limit (math-verify's default, 5 s).
      Differs from verl: verl's default scores MATH with its own string normaliser (math-verify is
      its documented option).
    Any other data source raises ValueError listing the known ones: a reward that silently scores 0
    would train on nothing. For other tasks load your own with `load_reward_fn`.
    """
    if data_source in GSM8K_SOURCES:
        return gsm8k_score(solution_str, ground_truth, strict=True)
    if data_source in ARITHMETIC_SOURCES:
        return gsm8k_score(solution_str, ground_truth, strict=False)
    if data_source in MATH_SOURCES:
        return math_verify_score(solution_str, ground_truth, timeout_s=math_timeout_s)
    raise ValueError(
        f"no reward function for data_source={data_source!r}; known: {', '.join(map(repr, KNOWN_SOURCES))}. "
        "Pass your own compute_score to the recipe for other tasks (rlprims.rewards.load_reward_fn)."
    )


def score_responses(
    texts: Sequence[str], rows: Sequence[Mapping[str, Any]], *, reward_fn: Callable[..., float] = compute_score
) -> torch.Tensor:
    """One score per response: `reward_fn(row["data_source"], text, row["reward_model"]["ground_truth"],
    row.get("extra_info"))` for each (text, row) pair (row = the verl-schema row of its prompt).

    Raises ValueError if the counts differ, and names the row whose reward is not a finite number (a
    NaN reward would turn every advantage of its group into NaN).
    Shapes: len(texts) == len(rows) == B -> [B] float32 (CPU).
    """
    if len(texts) != len(rows):
        raise ValueError(f"{len(texts)} responses but {len(rows)} rows: pass one row per response")
    values = []
    for i, (text, row) in enumerate(zip(texts, rows)):
        value = reward_fn(row["data_source"], text, row["reward_model"]["ground_truth"], row.get("extra_info"))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward_fn returned {value!r} for response {i} (data_source "
                             f"{row['data_source']!r}): a reward must be a finite number")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float32)

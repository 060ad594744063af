"""The embedded task: integer arithmetic prompts, generated (never downloaded), in verl's schema."""

from __future__ import annotations

import random
from typing import Any

DATA_SOURCE = "rlprims/arithmetic"
INSTRUCTION = "Give the final answer as a number at the end of your reply."


def arithmetic_rows(
    n: int, *, seed: int, max_operand: int = 99, split: str = "train"
) -> list[dict[str, Any]]:
    """`n` prompts "What is a + b?" / "a - b" / "a * b" with 0 ≤ a, b ≤ max_operand, and their answers.

    Deterministic in `seed`; use different seeds for train and test. Scored by
    `rlprims.rewards.compute_score` with data_source "rlprims/arithmetic" (last number in the reply).
    Small operands make it a task a 135M model solves sometimes, which is what GRPO needs: groups with
    both right and wrong answers.
    """
    if n < 0 or max_operand < 1:
        raise ValueError(f"need n >= 0 and max_operand >= 1, got n={n}, max_operand={max_operand}")
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-*")
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        question = f"What is {a} {op} {b}? {INSTRUCTION}"
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": question}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows

"""The embedded task: integer arithmetic prompts, generated (never downloaded), in verl's schema.

Levels (`level=`):
  0  the default task (what recipes/grpo.py trains on): "a op b", op in + - *, 0 <= a, b <= max_operand
     (default 99). Its rows are exactly those of earlier versions (no "level" in extra_info).
  1  "a + b", 0 <= a, b <= 20.
  2  "a + b" or "a - b", 0 <= a, b <= 999 (differences may be negative).
  3  "a * b + c" or "a * b - c", 2 <= a, b <= 20, 0 <= c <= 99: two steps.
The same generator gives RL prompt rows (`arithmetic_rows`), SFT rows with a worked answer
(`arithmetic_sft_rows`) and preference rows with a right and a wrong answer (`arithmetic_preference_rows`).

CLI:  python -m rlprims.data.arithmetic --out DIR --train N --test M [--level L] [--seed S]
      [--kind rl|sft|preference]  writes DIR/train.parquet and DIR/test.parquet (test uses seed S+1).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any, NamedTuple

DATA_SOURCE = "rlprims/arithmetic"
INSTRUCTION = "Give the final answer as a number at the end of your reply."
LEVELS = (0, 1, 2, 3)


class Problem(NamedTuple):
    """One generated problem: the expression, its value, and the worked steps ("a * b = p", ...)."""

    expression: str
    answer: int
    steps: tuple[str, ...]


def _problem(rng: random.Random, level: int, max_operand: int) -> Problem:
    # Level 0 draws a, b, then op: the order of rng calls fixes the default task's rows; keep it.
    if level == 0:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-*")
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(f"{a} {op} {b}", answer, (f"{a} {op} {b} = {answer}",))
    if level == 1:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return Problem(f"{a} + {b}", a + b, (f"{a} + {b} = {a + b}",))
    if level == 2:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-")
        answer = a + b if op == "+" else a - b
        return Problem(f"{a} {op} {b}", answer, (f"{a} {op} {b} = {answer}",))
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(0, 99)
    op = rng.choice("+-")
    product = a * b
    answer = product + c if op == "+" else product - c
    steps = (f"{a} * {b} = {product}", f"{product} {op} {c} = {answer}")
    return Problem(f"{a} * {b} {op} {c}", answer, steps)


def arithmetic_problems(
    n: int, *, seed: int, level: int = 0, max_operand: int | None = None
) -> list[Problem]:
    """`n` problems of the given level, deterministic in (seed, level, max_operand).

    max_operand applies to level 0 only (default 99); levels 1-3 fix their own ranges.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if level != 0 and max_operand is not None:
        raise ValueError(f"max_operand applies to level 0 only; level {level} fixes its own ranges")
    max_operand = 99 if max_operand is None else max_operand
    if n < 0 or max_operand < 1:
        raise ValueError(f"need n >= 0 and max_operand >= 1, got n={n}, max_operand={max_operand}")
    rng = random.Random(seed)
    return [_problem(rng, level, max_operand) for _ in range(n)]


def _question(problem: Problem) -> str:
    return f"What is {problem.expression}? {INSTRUCTION}"


def _extra_info(split: str, index: int, level: int) -> dict[str, Any]:
    info: dict[str, Any] = {"split": split, "index": index}
    return info if level == 0 else {**info, "level": level}


def worked_answer(problem: Problem) -> str:
    """The reference reply: the steps, then "The answer is X." (its last number is the answer)."""
    return " ".join(f"{step}." for step in problem.steps) + f" The answer is {problem.answer}."


def arithmetic_rows(
    n: int, *, seed: int, max_operand: int | None = None, split: str = "train", level: int = 0
) -> list[dict[str, Any]]:
    """`n` prompt rows "What is <expression>? ..." in verl's schema, with their answers.

    Deterministic in `seed`; use different seeds for train and test. Scored by
    `rlprims.rewards.compute_score` with data_source "rlprims/arithmetic" (last number in the reply).
    Level 0 (default: a op b, 0 <= a, b <= max_operand = 99) makes a task a 135M model solves
    sometimes, which is what GRPO needs: groups with both right and wrong answers. extra_info holds
    split, index and (levels 1-3) level.
    """
    problems = arithmetic_problems(n, seed=seed, level=level, max_operand=max_operand)
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": _question(p)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(p.answer)},
            "extra_info": _extra_info(split, index, level),
        }
        for index, p in enumerate(problems)
    ]


def arithmetic_sft_rows(
    n: int, *, seed: int, max_operand: int | None = None, split: str = "train", level: int = 0
) -> list[dict[str, Any]]:
    """`n` SFT rows {prompt: str, response: worked answer, data_source, extra_info} (verl's SFT columns).

    Same problems as `arithmetic_rows` for the same arguments; the response is `worked_answer`.
    """
    problems = arithmetic_problems(n, seed=seed, level=level, max_operand=max_operand)
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": _question(p),
            "response": worked_answer(p),
            "extra_info": _extra_info(split, index, level),
        }
        for index, p in enumerate(problems)
    ]


def arithmetic_preference_rows(
    n: int, *, seed: int, max_operand: int | None = None, split: str = "train", level: int = 0
) -> list[dict[str, Any]]:
    """`n` preference rows {prompt, chosen, rejected, data_source, extra_info} for Bradley-Terry training.

    chosen = the worked answer; rejected = the same reply with the final answer off by a nonzero
    d in [-10, 10] (drawn from a second generator seeded by `seed`, so the problems match
    `arithmetic_rows`). The rejected reply is written the same way, so only correctness separates them.
    """
    problems = arithmetic_problems(n, seed=seed, level=level, max_operand=max_operand)
    wrong_rng = random.Random(f"rlprims.arithmetic.rejected:{seed}")
    rows = []
    for index, p in enumerate(problems):
        delta = wrong_rng.choice([d for d in range(-10, 11) if d != 0])
        wrong = p.answer + delta
        *first, last = p.steps
        wrong_last = last.rsplit("=", 1)[0] + f"= {wrong}"
        rejected = " ".join(f"{step}." for step in (*first, wrong_last)) + f" The answer is {wrong}."
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": _question(p),
                "chosen": worked_answer(p),
                "rejected": rejected,
                "extra_info": _extra_info(split, index, level),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """CLI: writes OUT/train.parquet (seed S) and OUT/test.parquet (seed S + 1)."""
    from rlprims.data.preference import write_preference_parquet
    from rlprims.data.sft import write_sft_parquet
    from rlprims.data.verl_parquet import write_verl_parquet

    parser = argparse.ArgumentParser(prog="python -m rlprims.data.arithmetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=4096, help="rows in train.parquet")
    parser.add_argument("--test", type=int, default=256, help="rows in test.parquet")
    parser.add_argument("--level", type=int, default=0, choices=LEVELS, help="difficulty level")
    parser.add_argument("--max-operand", type=int, default=None, help="level 0 only (default 99)")
    parser.add_argument("--seed", type=int, default=0, help="train seed; test uses seed + 1")
    parser.add_argument("--kind", default="rl", choices=("rl", "sft", "preference"),
                        help="rl: verl prompt rows; sft: prompt/response; preference: prompt/chosen/rejected")
    args = parser.parse_args(argv)
    make, write = {
        "rl": (arithmetic_rows, write_verl_parquet),
        "sft": (arithmetic_sft_rows, write_sft_parquet),
        "preference": (arithmetic_preference_rows, write_preference_parquet),
    }[args.kind]
    for split, n, seed in (("train", args.train, args.seed), ("test", args.test, args.seed + 1)):
        if n == 0:
            continue
        rows = make(n, seed=seed, level=args.level, max_operand=args.max_operand, split=split)
        path = write(rows, Path(args.out) / f"{split}.parquet")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()

"""The embedded tool task (multiplying 3-digit numbers with a calculator) and prompts that offer tools.

Rows are verl's schema. The tools a row may call are named in its `extra_info`: `tools` (a list of
names, rlprims' own key) or `tools_kwargs` (verl's agent-loop key, a mapping from tool name to that
tool's options; only its keys are read here). The tool functions themselves come from the recipe
(`--tools`), as verl takes them from its tool config.

`multiplication_rows` makes the task: "What is a * b?" with a, b of `digits` digits. SmolLM2-135M
answers ~0% of them unaided (it cannot multiply 3-digit numbers) but can call the calculator: each
prompt starts with `demos` solved examples (2-digit products) in which the assistant calls the tool
in the Hermes format, reads the result, and answers; with fewer demos it calls the tool less often
and less well, which is what RL then improves.

CLI:  python -m rlprims.data.tool_tasks --out DIR --train N --test M [--demos K] [--seed S]
      writes DIR/train.parquet and DIR/test.parquet (test uses seed S+1), for `--train-files`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DATA_SOURCE = "rlprims/arithmetic"  # scored by rlprims.rewards.compute_score: the last number of the answer
INSTRUCTION = "Give the final answer as a number at the end of your reply."
_DEMO_PAIRS = ((17, 23), (45, 61), (8, 92), (36, 57))


def _question(a: int, b: int) -> str:
    return f"What is {a} * {b}? {INSTRUCTION}"


def calculator_demo(a: int, b: int) -> list[dict[str, str]]:
    """A solved example: the question, the Hermes call of `calculator`, its result, the answer."""
    call = {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
    return [
        {"role": "user", "content": _question(a, b)},
        {"role": "assistant", "content": f"<tool_call>{json.dumps(call)}</tool_call>"},
        {"role": "tool", "content": str(a * b)},
        {"role": "assistant", "content": f"The answer is {a * b}."},
    ]


def multiplication_rows(
    n: int, *, seed: int, digits: int = 3, demos: int = 2, split: str = "train"
) -> list[dict[str, Any]]:
    """`n` rows "What is a * b?" (a, b with `digits` digits) that offer the `calculator` tool.

    The prompt is `demos` solved examples (`calculator_demo`, 0 to 4) followed by the question; the
    ground truth is a * b; extra_info = {split, index, tools: ["calculator"]}. Deterministic in
    `seed` (use different seeds for train and test).
    """
    if n < 0 or digits < 1 or not 0 <= demos <= len(_DEMO_PAIRS):
        raise ValueError(
            f"need n >= 0, digits >= 1, 0 <= demos <= {len(_DEMO_PAIRS)}; got {n}, {digits}, {demos}"
        )
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1), 10**digits - 1
    context = [m for a, b in _DEMO_PAIRS[:demos] for m in calculator_demo(a, b)]
    rows = []
    for index in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [*context, {"role": "user", "content": _question(a, b)}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a * b)},
                "extra_info": {"split": split, "index": index, "tools": ["calculator"]},
            }
        )
    return rows


def row_tool_names(row: Mapping[str, Any]) -> list[str]:
    """The tools a row offers: extra_info["tools"] (a list of names) or the keys of verl's
    extra_info["tools_kwargs"]; [] when neither is present."""
    info = row.get("extra_info") or {}
    if info.get("tools") is not None:
        return [str(t) for t in info["tools"]]
    return [str(k) for k, v in (info.get("tools_kwargs") or {}).items() if v is not None]


def tool_prompt_ids(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    schemas: Mapping[str, Mapping[str, Any]],
    *,
    render: Callable[[Any, Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]], str],
    max_len: int,
) -> list[tuple[list[int], dict[str, Any]]]:
    """(prompt token ids, row) for each row whose prompt, rendered with its tools, fits `max_len` tokens.

    render: (tokenizer, messages, schemas) -> prompt text, e.g. `rlprims.rollout.minimal_tool_prompt`
      (templates without a tool section) or `rlprims.rollout.template_tool_prompt`.
    schemas: tool name -> JSON schema of every tool the run has (`ToolPool.schemas`). A row naming a
      tool not in it raises ValueError (the model would be offered a tool that cannot run).
    Longer prompts are dropped (verl's filter_overlong_prompts); order is kept.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    kept = []
    for i, row in enumerate(rows):
        names = row_tool_names(row)
        unknown = [t for t in names if t not in schemas]
        if unknown:
            raise ValueError(
                f"row {i} names tool(s) {unknown} in extra_info, but the run has {sorted(schemas)}"
            )
        text = render(tokenizer, row["prompt"], [schemas[t] for t in names])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_len:
            kept.append((list(ids), row))
    return kept


def main(argv: list[str] | None = None) -> None:
    """CLI: writes OUT/train.parquet (seed S) and OUT/test.parquet (seed S + 1)."""
    from rlprims.data.verl_parquet import write_verl_parquet

    parser = argparse.ArgumentParser(
        prog="python -m rlprims.data.tool_tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=4096, help="rows in train.parquet")
    parser.add_argument("--test", type=int, default=256, help="rows in test.parquet")
    parser.add_argument("--digits", type=int, default=3, help="digits of each factor")
    parser.add_argument("--demos", type=int, default=2, help="solved examples before each question (0-4)")
    parser.add_argument("--seed", type=int, default=0, help="train seed; test uses seed + 1")
    args = parser.parse_args(argv)
    for split, n, seed in (("train", args.train, args.seed), ("test", args.test, args.seed + 1)):
        if n:
            rows = multiplication_rows(n, seed=seed, digits=args.digits, demos=args.demos, split=split)
            print(
                f"wrote {len(rows)} rows to {write_verl_parquet(rows, Path(args.out) / f'{split}.parquet')}"
            )


if __name__ == "__main__":
    main()

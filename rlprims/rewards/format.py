"""A format reward: does the response end with a final answer in a recognised form?"""

from __future__ import annotations

import re

# "#### <number>" as the last line (GSM8K); the number may carry a sign, commas and decimals.
_GSM8K_END = re.compile(r"(?:^|\n)[ \t]*#### ?-?[0-9][0-9,]*(?:\.[0-9]+)?\.?\s*$")
# What may follow a final \boxed{...}: closing math delimiters, a period, whitespace.
_AFTER_BOXED = re.compile(r"^[\s.$]*(?:\\\]|\\\))?[\s.$]*$")


def _last_boxed_end(text: str) -> int | None:
    """Index just past the last complete \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def format_score(solution_str: str) -> float:
    """1.0 if the response ends with a final answer in one of two forms, else 0.0.

    - GSM8K: the last line is "#### <number>" (e.g. "#### -1,234.5"), a trailing period and
      whitespace allowed.
    - LaTeX: the last "\\boxed{...}" is complete (balanced braces), non-empty, and only whitespace,
      periods, "$" or a closing "\\]" / "\\)" follow it.
    It checks the form, not the value: add it to a correctness reward (as a small bonus) to teach the
    format, e.g. `gsm8k_score(...) + 0.1 * format_score(...)`.
    """
    if _GSM8K_END.search(solution_str):
        return 1.0
    end = _last_boxed_end(solution_str)
    if end is None:
        return 0.0
    inside = solution_str[solution_str.rfind("\\boxed{") + len("\\boxed{") : end - 1]
    return 1.0 if inside.strip() and _AFTER_BOXED.match(solution_str[end:]) else 0.0

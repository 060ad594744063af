"""GSM8K-style scoring: the final number of a response against the ground truth."""

from __future__ import annotations

import re

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")
# verl looks only at the end of the response: a long response that restates the question's numbers
# must still be judged by its conclusion.
_TAIL_CHARS = 300


def _normalize(number: str) -> str:
    return number.replace(",", "").replace("$", "").rstrip(".")


def extract_gsm8k_answer(solution_str: str, *, strict: bool) -> str | None:
    """The answer a response gives, or None.

    strict: the number after the last "#### " (GSM8K's format). Otherwise: the last number in the
    response. Only the last 300 characters are read (verl). Commas and a trailing period are dropped,
    so "1,234." reads as "1234".
    """
    tail = solution_str[-_TAIL_CHARS:]
    if strict:
        found = _STRICT.findall(tail)
        return _normalize(found[-1]) if found else None
    for candidate in reversed(_NUMBER.findall(tail)):
        normalized = _normalize(candidate)
        if normalized not in ("", ".", "-"):
            return normalized
    return None


def gsm8k_score(
    solution_str: str,
    ground_truth: str,
    *,
    strict: bool = True,
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """`score` if the extracted answer equals the ground truth, `format_score` if an answer was found but
    is wrong, 0 if none was found (verl's gsm8k.compute_score). Answers compare as normalized strings;
    "42" and "42.0" differ, as in verl.
    """
    answer = extract_gsm8k_answer(solution_str, strict=strict)
    if answer is None:
        return 0.0
    return score if answer == _normalize(str(ground_truth)) else format_score

"""verl's reward-function signature, dispatching on the dataset name; scoring a batch of responses."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING, Any, NamedTuple

from rlprims.rewards.gsm8k import gsm8k_score
from rlprims.rewards.loading import LoadedRewardFn
from rlprims.rewards.math import math_verify_score
from rlprims.rewards.pool import RewardPool, call_reward

if TYPE_CHECKING:
    import torch

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k")
ARITHMETIC_SOURCES = ("rlprims/arithmetic",)
# The MATH datasets verl's default_compute_score sends to its math scorer; here: math-verify.
MATH_SOURCES = ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")
KNOWN_SOURCES = GSM8K_SOURCES + ARITHMETIC_SOURCES + MATH_SOURCES

_HOW_TO_PASS_YOURS = (
    "Pass your own verl-style compute_score(data_source, solution_str, ground_truth, extra_info) to the "
    "recipe with --reward-fn path/to/file.py:function (or --reward-fn package.module:function)"
)


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
    Any other data source raises ValueError listing the known ones and naming --reward-fn: a reward
    that silently scores 0 would train on nothing. `check_reward_sources` finds this before training.
    """
    if data_source in GSM8K_SOURCES:
        return gsm8k_score(solution_str, ground_truth, strict=True)
    if data_source in ARITHMETIC_SOURCES:
        return gsm8k_score(solution_str, ground_truth, strict=False)
    if data_source in MATH_SOURCES:
        return math_verify_score(solution_str, ground_truth, timeout_s=math_timeout_s)
    raise ValueError(f"no reward function for data_source={data_source!r}; known: "
                     f"{', '.join(map(repr, KNOWN_SOURCES))}. {_HOW_TO_PASS_YOURS}.")


def check_reward_sources(reward_fn: Callable[..., Any], data_sources: Iterable[str]) -> None:
    """Before training: raise ValueError if the built-in `compute_score` cannot score a data source.

    `reward_fn` is what the recipe will score with (`compute_score`, a `load_reward_fn(...)` result or
    any function); `data_sources` the `data_source` of every train and validation row (repeats are
    fine). Only the built-in is checked (also when loaded as "rlprims.rewards:compute_score"): a user's
    function dispatches as it likes. The error names the unknown sources, the known ones and
    --reward-fn.
    """
    fn = reward_fn.load() if isinstance(reward_fn, LoadedRewardFn) else reward_fn
    if fn is not compute_score:
        return
    unknown = sorted(set(data_sources) - set(KNOWN_SOURCES))
    if unknown:
        raise ValueError(
            f"rlprims' built-in compute_score has no scorer for data_source {', '.join(map(repr, unknown))} "
            f"(it knows {', '.join(map(repr, KNOWN_SOURCES))}). {_HOW_TO_PASS_YOURS}."
        )


class RewardResult(NamedTuple):
    """What `score_responses` returns for B responses.

    scores: [B] float32 (CPU): the reward function's score; `timeout_score` / `error_score` for a
      failed call.
    extra: the other keys of dict results (verl's reward_extra_info), each a list of B values, None
      where a response's result lacked the key or its call failed.
    metrics: "reward/timeouts" and "reward/errors" (counts of failed calls, as floats), and
      "reward/{key}/mean" for each key of `extra` whose values are numbers or bools (over the
      responses that have one). Counts add across ranks; means average.
    errors: one line per failed call: "response i (data_source 'x'): what happened".
    """

    scores: torch.Tensor
    extra: dict[str, list[Any]]
    metrics: dict[str, float]
    errors: tuple[str, ...]


def score_responses(
    texts: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    scorer: RewardPool | Callable[..., Any],
    *,
    timeout_score: float = 0.0,
    error_score: float = 0.0,
    max_failed_frac: float = 0.5,
) -> RewardResult:
    """Score each response: `reward_fn(row["data_source"], text, row["reward_model"]["ground_truth"],
    row.get("extra_info"))` for each (text, row) pair (row = the verl-schema row of its prompt).

    scorer: a `RewardPool` (`reward_pool(reward_fn, timeout_s=...)`: calls run in parallel in worker
      processes, each under the pool's time limit) or the reward function itself (called here, one
      by one, without a time limit: for tests and debugging).
    A result may be a number, a bool (True = 1.0) or a dict {"score": number, other keys...} (verl);
    the other keys land in `extra`. A call that passes the time limit scores `timeout_score` and one
    that raises, kills its worker, or returns something else (no "score", not finite: a NaN reward
    would turn its whole group's advantages into NaN) scores `error_score`; both are counted in
    `metrics` and described in `errors`. More than `max_failed_frac` of the calls failing raises
    RuntimeError with the counts and the first failure: a run whose rewards mostly fail trains on
    nothing. Raises ValueError if the counts differ.
    Shapes: len(texts) == len(rows) == B -> scores [B] float32 (CPU).
    """
    if len(texts) != len(rows):
        raise ValueError(f"{len(texts)} responses but {len(rows)} rows: pass one row per response")
    calls = [(row["data_source"], text, row["reward_model"]["ground_truth"], row.get("extra_info"))
             for text, row in zip(texts, rows)]
    if isinstance(scorer, RewardPool):
        outcomes = _call_in_pool(scorer, calls)
    else:
        outcomes = [call_reward(scorer, args) for args in calls]
    scores, extras, errors, timeouts = [], [], [], 0
    for i, ((ok, value), args) in enumerate(zip(outcomes, calls)):
        if ok:
            try:
                score, extra = _as_score(value)
            except ValueError as e:
                ok, value = False, str(e)
        if ok:
            scores.append(score)
            extras.append(extra)
            continue
        timed_out = value is None
        timeouts += timed_out
        scores.append(timeout_score if timed_out else error_score)
        extras.append({})
        what = f"no result within {scorer.timeout_s} s (time limit)" if timed_out else value
        errors.append(f"response {i} (data_source {args[0]!r}): {what}")
    if len(errors) > max_failed_frac * len(calls):
        raise RuntimeError(
            f"{len(errors)} of {len(calls)} reward calls failed ({timeouts} past the time limit, "
            f"{len(errors) - timeouts} errors); first: {errors[0]}. Fix the reward function, or raise "
            "the time limit (reward_pool(timeout_s=...))."
        )
    keys = list(dict.fromkeys(k for extra in extras for k in extra))
    extra = {k: [e.get(k) for e in extras] for k in keys}
    metrics = {"reward/timeouts": float(timeouts), "reward/errors": float(len(errors) - timeouts)}
    for k, values in extra.items():
        numbers = [float(v) for v in values if _is_number(v)]
        if numbers and all(_is_number(v) for v in values if v is not None):
            metrics[f"reward/{k}/mean"] = math.fsum(numbers) / len(numbers)
    import torch  # here, not at the top: reward workers and math-verify's child process run without it

    return RewardResult(torch.tensor(scores, dtype=torch.float32), extra, metrics, tuple(errors))


def _call_in_pool(pool: RewardPool, calls: list[tuple]) -> list[tuple[bool, Any]]:
    """(True, value) / (False, message) per call; (False, None) when it passed the time limit."""
    from pebble import ProcessExpired

    try:
        futures = [pool.executor.schedule(call_reward, args=(pool.reward_fn, args), timeout=pool.timeout_s)
                   for args in calls]
    except RuntimeError as e:
        raise RuntimeError(f"the reward pool cannot take calls ({e}); was it closed?") from e
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except FutureTimeoutError:
            outcomes.append((False, None))
        except ProcessExpired as e:
            outcomes.append((False, f"the worker process died (exit code {e.exitcode})"))
        except Exception as e:  # noqa: BLE001 - e.g. arguments or a result that do not pickle
            outcomes.append((False, f"{type(e).__name__}: {e}"))
    return outcomes


def _is_number(value: Any) -> bool:
    try:
        return not isinstance(value, (str, bytes)) and math.isfinite(float(value))
    except Exception:  # noqa: BLE001 - anything float() refuses (a string, a 2-element array, ...)
        return False


def _as_score(value: Any) -> tuple[float, dict[str, Any]]:
    """(score, extra keys) of a number, bool or {"score": ..., ...} result; ValueError otherwise."""
    extra: dict[str, Any] = {}
    if isinstance(value, Mapping):
        if "score" not in value:
            raise ValueError(f"a dict reward needs a 'score' key (verl), got keys {sorted(map(str, value))}")
        extra = {str(k): v for k, v in value.items() if k != "score"}
        value = value["score"]
    if not _is_number(value):
        raise ValueError(f"reward_fn returned {value!r}: a reward must be a finite number, a bool, or a "
                         "dict with a finite 'score'")
    return float(value), extra

"""Math answers checked for equivalence with math-verify (sympy), under a time limit in any thread.

Time limits. math-verify's own timeouts use signal.alarm with whole seconds and fail outside the main
thread, so they are switched off and replaced:
- main thread: SIGALRM from a repeating interval timer (setitimer) raises math-verify's
  TimeoutException at the deadline and every 50 ms after, until scoring unwinds (math-verify catches
  it inside each comparison and moves on to the next, so one shot could be swallowed). CPython checks
  signals inside long big-integer arithmetic too, so "9^{9^{9^9}}" is cut off. math-verify may
  also turn the interruption into an empty parse (then "ground truth does not parse"): any error
  after the deadline counts as the timeout.
- any other thread: scoring runs in a fresh Python process (`python -m rlprims.rewards.math`, no
  fork of a threaded parent, no re-import of __main__) that is killed at the deadline. No in-process
  mechanism can interrupt a thread stuck in one C call, which holds the GIL; a process can always be
  killed. Each call pays a process
  start and a sympy import (about a second) before its deadline starts: score from the main thread, or
  from a process pool, when throughput matters.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

_REPEAT_S = 0.05
_CHILD_START_S = 120.0


def _equal(solution_str: str, gold_text: str) -> float:
    """1.0 / 0.0: math-verify's parse of both and verify, with its own (signal) timeouts off."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = parse(gold_text, extraction_config=(LatexExtractionConfig(),), parsing_timeout=None)
    if not gold:
        raise ValueError(f"ground truth {gold_text!r} does not parse as math")
    pred = parse(solution_str, extraction_config=(ExprExtractionConfig(), LatexExtractionConfig()),
                 parsing_timeout=None)
    return 1.0 if pred and verify(gold, pred, timeout_seconds=None) else 0.0


def _with_alarm(solution_str: str, gold_text: str, timeout_s: float) -> float | None:
    """_equal under a SIGALRM deadline (main thread only); None on timeout."""
    from math_verify.errors import TimeoutException

    fired = [False]

    def on_alarm(signum: int, frame: Any) -> None:
        fired[0] = True
        raise TimeoutException("rlprims math_verify_score deadline")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s, _REPEAT_S)
        try:
            value = _equal(solution_str, gold_text)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Exception:  # math-verify may turn our TimeoutException into another error (an empty parse)
        if not fired[0]:
            raise
        value = None
    finally:
        # A shot already pending when the timer stopped is dropped here, not raised later.
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, lambda *_: None)
        signal.signal(signal.SIGALRM, previous)
    return None if fired[0] else value


def _read_line(fd: int, buffer: bytearray, deadline: float) -> str | None:
    """The next line from a pipe, or None if none is complete by `deadline` (time.monotonic)."""
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError("math_verify_score: the scoring process exited without an answer")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def _in_child(solution_str: str, gold_text: str, timeout_s: float) -> float | None:
    """_equal in a fresh Python process, killed at the deadline; None on timeout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rlprims.rewards.math"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        process.stdin.write(json.dumps({"solution": solution_str, "gold": gold_text}).encode())
        process.stdin.close()
        fd, buffer = process.stdout.fileno(), bytearray()
        if _read_line(fd, buffer, time.monotonic() + _CHILD_START_S) != "ready":
            raise RuntimeError("math_verify_score: the scoring process did not start")
        line = _read_line(fd, buffer, time.monotonic() + timeout_s)
        if line is None:
            return None
        answer = json.loads(line)
        if "error" in answer:
            raise ValueError(answer["error"])
        return float(answer["score"])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


def _child_main() -> None:
    """`python -m rlprims.rewards.math`: one request on stdin, "ready" then a JSON answer on stdout."""
    import math_verify  # noqa: F401 - imported before "ready", so the deadline covers scoring only

    request = json.loads(sys.stdin.read())
    print("ready", flush=True)
    try:
        answer = {"score": _equal(request["solution"], request["gold"])}
    except Exception as e:  # noqa: BLE001 - handed to the parent
        answer = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(answer), flush=True)


def math_verify_score(
    solution_str: str, ground_truth: str, *, timeout_s: float, timeout_score: float = 0.0
) -> float:
    """1.0 if the response's final answer equals the ground truth mathematically, else 0.0.

    As verl's reward_score/math_verify.py: the gold is parsed from "\\boxed{ground_truth}" (LaTeX;
    ground truth already holding \\boxed is used as is), the response with math-verify's expression
    and LaTeX extractors (last \\boxed{}, last $...$, or a plain number), then `math_verify.verify`
    (numeric, symbolic, set and interval equivalence: "\\frac{1}{2}" == "0.5").
    Time limit: parse + verify get `timeout_s` seconds; past it the score is `timeout_score` (verl: 0).
    It holds in any thread (see the module docstring for how). A ground truth that does not parse
    raises ValueError: it is a data error, not a wrong answer.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    gold_text = ground_truth if "\\boxed" in ground_truth else "\\boxed{" + ground_truth + "}"
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        value = _with_alarm(solution_str, gold_text, timeout_s)
    else:
        value = _in_child(solution_str, gold_text, timeout_s)
    return timeout_score if value is None else value


if __name__ == "__main__":
    _child_main()

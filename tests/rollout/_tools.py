"""Module-level tools and interactions for the multi-turn tests (workers import them by reference)."""

from __future__ import annotations

import os
import time

from rlprims.rollout import InteractionReply


def echo(text: str) -> str:
    """Returns its argument.

    Args:
        text: Any text.
    """
    return text


def add(a: int, b: int = 0) -> int:
    """Adds two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def fail(reason: str) -> str:
    """Always raises.

    Args:
        reason: The error message.
    """
    raise ValueError(reason)


def hang(seconds: float) -> str:
    """Sleeps (a tool that hangs).

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke up"


def flood(megabytes: int) -> str:
    """Prints megabytes, then returns a short text.

    Args:
        megabytes: How much to print.
    """
    line = "x" * 1023 + "\n"
    for _ in range(megabytes * 1024):
        print(line, end="")
    return "done"


def big(megabytes: int) -> str:
    """Returns a huge string.

    Args:
        megabytes: Its size.
    """
    return "y" * (megabytes << 20)


def die(code: int) -> str:
    """Kills its own process.

    Args:
        code: The exit code.
    """
    os._exit(code)


def worker_pid() -> int:
    """The process id of the worker that runs the call."""
    return os.getpid()


def guess_game(messages: list[dict], row: dict) -> InteractionReply:
    """A simulated user: asks again until the last assistant message holds the row's answer."""
    answer = row["reward_model"]["ground_truth"]
    last = messages[-1]["content"]
    if answer in last:
        return InteractionReply("", done=True, reward=1.0)
    return InteractionReply(f"No, try again ({sum(m['role'] == 'user' for m in messages)}).", reward=0.0)


def broken_interaction(messages: list[dict], row: dict) -> InteractionReply:
    """An interaction that raises."""
    raise RuntimeError("simulator crashed")

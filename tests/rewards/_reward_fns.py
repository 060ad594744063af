"""verl-style reward functions that misbehave on purpose; the tests load them with
load_reward_fn("<this file>:behave"), so worker processes import this file by its path."""

import math
import os
import signal
import time

import math_verify

from rlprims.rewards import math_verify_score

# Import and first parse (grammar set-up) happen when a worker starts, not inside a call's time limit.
math_verify.parse(r"\boxed{1}")


def behave(data_source, solution_str, ground_truth, extra_info=None):
    """What `data_source` says; otherwise 1.0 if the response equals the ground truth, else 0.0."""
    right = solution_str == ground_truth
    if data_source == "sleep":
        time.sleep(10**6)
    if data_source == "sleep-ignoring-sigterm":  # as a C call that never returns to Python
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(10**6)
    if data_source == "raise":
        raise KeyError("no such thing")
    if data_source == "exit":
        os._exit(3)
    if data_source == "nan":
        return math.nan
    if data_source == "no-score":
        return {"acc": right}
    if data_source == "dict":
        return {"score": float(right), "acc": right, "pred": solution_str}
    if data_source == "bool":
        return right
    if data_source == "int":
        return int(right)
    if data_source == "pid":
        return {"score": 0.0, "pid": os.getpid()}
    if data_source == "math":  # never finishes on its own: math-verify's own limit must cut it
        return math_verify_score(r"\boxed{9^{9^{9^{9}}}}", "1", timeout_s=0.2, timeout_score=-1.0)
    return float(right)

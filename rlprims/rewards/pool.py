"""Reward calls in worker processes: a time limit per call, hangs and crashes contained, calls in parallel.

A reward function is user code (`--reward-fn`) or sympy (math-verify): either can loop forever, hold
the GIL in one C call, or kill its process. In the trainer, any of these stops training (issue: a
`time.sleep(10**6)` reward hung step-0 validation forever). So each call runs in a worker process of
a pebble `ProcessPool` (https://github.com/noxdafox/pebble), which kills a worker whose call passes its
time limit (SIGTERM, SIGKILL 3 s later) or that died, and starts a new one.

Processes. Workers are forked from multiprocessing's forkserver, never from the trainer: the trainer
runs vLLM / torch threads, and fork() of a threaded process can deadlock the child. The forkserver
imports, once per run, rlprims.rewards, the reward function's module and what the caller's __main__
imported (`_preload_modules`); a worker then starts in ~0.1 s, including one that replaces a killed
worker. Start-up (the forkserver's imports: ~12 s for a __main__ that imports vLLM, on a loaded 2-core
CPU machine) runs in a background thread from `reward_pool`, overlapping the trainer's own start; a run
pays it once. The calling script needs the `if __name__ == "__main__":` guard, as any multiprocessing
program. A killed trainer leaves no workers behind (`_exit_with_trainer`).

Limits. pebble's clock starts when a worker takes the call, so queueing behind other calls and
worker start-up do not count. A call that returns within the limit is never cut; one past it costs
the limit plus up to ~0.2 s (pebble polls every 0.1 s), plus 3 s when the worker ignores SIGTERM (a C
call that never returns to Python).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlprims.rewards.loading import LoadedRewardFn

DEFAULT_TIMEOUT_S = 10.0  # per call; above compute_score's math-verify limit (5 s), which scores 0.0 itself


@dataclass(frozen=True)
class RewardPool:
    """Worker processes that run `reward_fn`, each call under `timeout_s`. Make it with `reward_pool`.

    Close it with `close()` or use it as a context manager; at interpreter exit pebble stops leftover
    workers too.
    """

    reward_fn: Callable[..., Any]
    timeout_s: float
    workers: int
    executor: Any = field(repr=False, compare=False)  # pebble.ProcessPool

    def close(self) -> None:
        """Stop the workers now (a call still running is killed). Idempotent."""
        self.executor.stop()
        self.executor.join(timeout=30)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reward_pool(
    reward_fn: Callable[..., Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None
) -> RewardPool:
    """Worker processes for `score_responses(texts, rows, pool)`; make one per run, close it at the end.

    reward_fn: verl's compute_score signature: `rlprims.rewards.compute_score`, a `load_reward_fn(...)`
      result, or any module-level function (it is pickled by reference into the workers).
    timeout_s: time limit of one call (one response), seconds.
    workers: processes; default min(8, CPU cores available to this process). Calls beyond them queue.
    Returns at once: the workers start in the background (see the module docstring). ValueError when
    `reward_fn` cannot be pickled (a lambda or a nested function: define it at module level or load it
    with `load_reward_fn`), when timeout_s <= 0 or workers < 1. Needs the `pebble` package
    (`pip install 'rlprims[rewards]'`).
    """
    try:
        import pebble
    except ImportError as e:
        raise ImportError("reward_pool needs pebble: pip install 'rlprims[rewards]'") from e
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    workers = min(8, len(os.sched_getaffinity(0))) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    try:
        pickle.dumps(reward_fn)
    except Exception as e:
        raise ValueError(
            f"reward_fn {reward_fn!r} cannot be sent to worker processes ({e}); define it at module level, "
            "or load it with rlprims.rewards.load_reward_fn('path/file.py:function')"
        ) from e
    context = multiprocessing.get_context("forkserver")
    # Takes effect only if this process's forkserver is not running yet (then it is multiprocessing's
    # default, "__main__", plus these); import errors of preloaded modules are ignored there.
    context.set_forkserver_preload(["__main__", *_preload_modules(reward_fn)])
    executor = pebble.ProcessPool(max_workers=workers, initializer=_init_worker,
                                  initargs=(reward_fn, os.getpid()), context=context)
    # The first schedule starts the forkserver and the workers; do it off the caller's thread.
    threading.Thread(target=_start, args=(executor,), name="rlprims-reward-pool-start", daemon=True).start()
    return RewardPool(reward_fn=reward_fn, timeout_s=float(timeout_s), workers=workers, executor=executor)


def _preload_modules(reward_fn: Callable[..., Any]) -> list[str]:
    """What the forkserver imports once: rlprims.rewards, the reward function's module, and every module
    the caller's __main__ imported. Each worker runs the __main__ script again (multiprocessing does, to
    unpickle what it defines; Python 3.11's forkserver does not preload it, whatever its preload list
    says), and finds those imports done: a worker starts in ~0.1 s, not the seconds of importing vLLM."""
    modules = ["rlprims.rewards"]
    if isinstance(reward_fn, LoadedRewardFn):
        target = reward_fn.spec.rsplit(":", 1)[0]
        module = None if target.endswith(".py") or os.sep in target else target
    else:
        module = getattr(reward_fn, "__module__", None)
    if module and module != "__main__":
        modules.append(module)
    if module and module.startswith("rlprims.rewards"):
        modules.append("math_verify")  # imported lazily by math_verify_score, inside its time limit
    for key, value in list(vars(sys.modules["__main__"]).items()):
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if not key.startswith("__") and isinstance(name, str) and name in sys.modules and name not in (
                "__main__", "__mp_main__", "builtins"):
            modules.append(name)
    return list(dict.fromkeys(modules))


def _start(executor: Any) -> None:
    try:
        executor.schedule(os.getpid)
    except Exception:  # noqa: BLE001 - a pool closed before it started; score_responses reports real faults
        pass


def _init_worker(reward_fn: Callable[..., Any], trainer_pid: int) -> None:
    """In each worker: die with the trainer; import the reward function's code."""
    _exit_with_trainer(trainer_pid)
    if isinstance(reward_fn, LoadedRewardFn):
        try:
            reward_fn.load()
        except Exception:  # noqa: BLE001 - each call raises it again, and score_responses reports it
            pass


def _exit_with_trainer(trainer_pid: int) -> None:
    """Make this worker die when the trainer does, even while a call holds the GIL in C code.

    The kernel sends SIGKILL when the worker's parent, the forkserver, exits (Linux PR_SET_PDEATHSIG).
    The forkserver exits once every holder of its "alive" pipe has closed it: the trainer, and each
    process the forkserver made, which inherits a copy; so the worker closes its copy (a private
    attribute of multiprocessing.forkserver). Where either step is unavailable, a thread polls the
    trainer's pid every second instead (it cannot run while a C call holds the GIL).
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    try:
        import ctypes

        if sys.platform != "linux" or ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:
            raise OSError("no PR_SET_PDEATHSIG")
        os.close(alive_fd)  # TypeError when the attribute is gone
        server._forkserver_alive_fd = None  # a forkserver used by the reward function is its own
    except (OSError, TypeError, AttributeError):
        threading.Thread(target=_watch_pid, args=(trainer_pid,), name="rlprims-watch", daemon=True).start()
    if not _pid_alive(trainer_pid):  # it died before the lines above took effect
        os._exit(1)


def _watch_pid(pid: int) -> None:
    while _pid_alive(pid):
        time.sleep(1.0)
    os._exit(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def call_reward(reward_fn: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
    """`reward_fn(*args)` in a worker: (True, value), or (False, "Type: message") if it raised."""
    try:
        return True, reward_fn(*args)
    except Exception as e:  # noqa: BLE001 - reported per response by score_responses
        return False, f"{type(e).__name__}: {e}"

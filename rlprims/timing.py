"""Wall-clock timing of a step's phases under verl's `timing_s/<phase>` names."""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

__all__ = ["timed"]


@contextmanager
def timed(timings: MutableMapping[str, float], phase: str) -> Iterator[None]:
    """Adds the wall seconds the block takes to timings[f"timing_s/{phase}"] (0 if absent; blocks of the
    same phase add up, e.g. DAPO's generation rounds). On CUDA, time what has synchronized (an `.item()`,
    a `.tolist()`): queued kernels are not waited for.

        timings = {}
        with timed(timings, "gen"):
            batch = generate(...)
    """
    t0 = time.perf_counter()
    try:
        yield
    finally:
        key = f"timing_s/{phase}"
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

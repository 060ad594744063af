"""A rank that fails or stalls mid-sync: every rank exits with an error within a bounded time, no hang.

torchrun with 2 gloo processes and a 3 s collective timeout (tests/parallel/_sync_worker.py). Rank 1
raises (or sleeps) after the first bucket; rank 0 is inside the next all-gather. Rank 0 must raise on its
own (peer gone / collective timeout) and torchrun then ends the job non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._procs import kill_tree

_REPO = Path(__file__).resolve().parents[2]
_WORKER = Path(__file__).with_name("_sync_worker.py")
_COLLECTIVE_TIMEOUT_S = 3
_BOUND_S = 90  # process start + imports (~10 s on 2 busy cores) + the timeout, with margin


def _run(mode: str) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(_WORKER), mode, str(_COLLECTIVE_TIMEOUT_S)]
    env = dict(os.environ, PYTHONPATH=str(_REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=_BOUND_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        log, _ = proc.communicate()
        pytest.fail(f"mode={mode}: the job hung for {_BOUND_S} s; last output:\n{log[-4000:]}")
    return proc.returncode, time.monotonic() - start, log


@pytest.mark.parametrize("mode", ["stall", "raise"])
def test_rank_failing_mid_sync_ends_the_job(mode):
    rc, elapsed, log = _run(mode)
    assert rc != 0, log[-4000:]
    assert log.count("first tensor synced") == 2, log[-4000:]  # the failure came mid-sync
    m = re.search(r"\[rank 0\] sync failed after ([0-9.]+) s: (\w+): (.*)", log)
    assert m is not None, f"rank 0 did not raise on its own:\n{log[-4000:]}"
    waited = float(m.group(1))
    if mode == "stall":  # nothing tells rank 0 but the clock: the collective timeout
        assert _COLLECTIVE_TIMEOUT_S - 0.5 <= waited <= _COLLECTIVE_TIMEOUT_S + 10, m.group(0)
        assert "timed out" in m.group(3).lower() or "timeout" in m.group(3).lower(), m.group(0)
    else:  # the peer's sockets close: rank 0 fails at once (or at the latest at the timeout)
        assert waited <= _COLLECTIVE_TIMEOUT_S + 10, m.group(0)
    assert "sync finished" not in log

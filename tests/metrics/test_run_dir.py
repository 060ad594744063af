"""rlprims.metrics.lock_run_dir: one run per output directory. A second run fails at once naming the
holder (in this process, in another process, on 2 gloo ranks where every rank fails), a killed holder's
lock is taken over, and unlocking frees the directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from rlprims.metrics import _take_lock, lock_run_dir, unlock_run_dir

ROOT = Path(__file__).resolve().parents[2]
_HOLDER = """
import sys, time
from rlprims.metrics import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_second_lock_fails_naming_the_holder_and_unlock_frees_it(tmp_path):
    out = tmp_path / "run"
    lock = lock_run_dir(out)  # creates the directory
    assert lock.path == out / ".run.lock" and lock.fd is not None
    holder = json.loads(lock.path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RuntimeError, match=rf"output directory {out} is in use by another run "
                                           rf"\(pid {os.getpid()} on host {socket.gethostname()}"):
        lock_run_dir(out)
    unlock_run_dir(lock)
    again = lock_run_dir(out)
    unlock_run_dir(again)


def _start_holder(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_other_process_holds_then_is_killed_and_its_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = _start_holder(out)
    try:
        with pytest.raises(RuntimeError, match=rf"{out} is in use by another run \(pid {proc.pid} on host "
                                               rf"{socket.gethostname()}"):
            lock_run_dir(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert json.loads((out / ".run.lock").read_text())["pid"] == proc.pid  # the stale file stays ...
    lock = lock_run_dir(out)  # ... and is taken over: the kernel dropped the killed process's flock
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    unlock_run_dir(lock)


def _gloo_worker(rank: int, world: int, init_file: str, held: str, free: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a hang fails the test instead of blocking it
    try:
        if rank == 0:  # another run holds `held` (a second open file description conflicts as one would)
            fd, error = _take_lock(Path(held, ".run.lock"))
            assert fd is not None and error is None
        dist.barrier()
        try:
            lock_run_dir(held)
            outcome = "locked"
        except RuntimeError as e:
            outcome = str(e)
        lock = lock_run_dir(free)
        result = {"held": outcome, "free_fd_is_none": lock.fd is None}
        Path(free, f"result-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_every_rank_fails_when_rank0_cannot_lock(tmp_path):
    held, free = tmp_path / "held", tmp_path / "free"
    torch.multiprocessing.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(held), str(free)),
                                nprocs=2, join=True)
    results = [json.loads((free / f"result-{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert f"output directory {held} is in use by another run" in r["held"]  # rank 1 too, no hang
    assert [r["free_fd_is_none"] for r in results] == [False, True]  # only rank 0 holds the file


def test_unwritable_directory_is_reported(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="cannot create the run lock"):
        lock_run_dir(tmp_path / "file" / "run")

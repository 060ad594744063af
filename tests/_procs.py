"""Killing a launched job for good: torchrun starts each worker in a session of its own, so killing
torchrun's process group leaves the workers running (a stalled one would sleep on after the test)."""

from __future__ import annotations

import psutil


def kill_tree(pid: int) -> None:
    """SIGKILLs `pid` and every process descended from it (children listed first, so none is missed)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)

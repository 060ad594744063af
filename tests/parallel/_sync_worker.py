"""One rank of the fault tests in test_faults.py (not collected by pytest).

usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel/_sync_worker.py MODE TIMEOUT_S

Shards a tiny Llama with FSDP2 (gloo, collective timeout TIMEOUT_S) and streams engine_weights. Rank 1
misbehaves after the first bucket: MODE=stall sleeps for 10 minutes, MODE=raise raises. Rank 0 prints
"[rank 0] sync failed after X s: <error>" when its collective fails, then re-raises.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

sys.path.insert(0, os.getcwd())  # the repository root


def main() -> None:
    mode, timeout_s = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    from rlprims.parallel import build_mesh, engine_weights, shard_model
    from tests.parallel.test_fsdp import make_model

    model = shard_model(make_model(), build_mesh(device_type="cpu", tp=1, timeout_s=timeout_s))
    stream = engine_weights(model, bucket_bytes=20_000)
    next(stream)
    print(f"[rank {rank}] first tensor synced", flush=True)
    if rank == 1:
        if mode == "stall":
            time.sleep(600)
        raise RuntimeError("rank 1 failed mid-sync (injected)")
    start = time.monotonic()
    try:
        for _ in stream:
            pass
    except Exception as e:
        print(f"[rank 0] sync failed after {time.monotonic() - start:.1f} s: {type(e).__name__}: {e}", flush=True)
        raise
    print("[rank 0] sync finished (unexpected)", flush=True)


if __name__ == "__main__":
    main()

"""Worker of test_default_model_builds_inside_a_process_group: run under torchrun with 2 processes.

Both ranks join a gloo group first (as the recipes do), then rank 1 builds the default model while rank 0
waits until rank 1 holds the build lock (its temporary directory exists) before asking for the model too.
"""

import sys
import time
from pathlib import Path

import torch.distributed as dist

from rlprims.rollout.default_model import default_model_path, verify_hf_model_dir

cache = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 0:
    deadline = time.monotonic() + 300
    while not list(cache.glob(".tmp-*")):  # rank 1 is converting, under the lock
        assert time.monotonic() < deadline, "rank 1 never started the conversion"
        time.sleep(0.05)
path = default_model_path(cache_dir=cache)
verify_hf_model_dir(path)
dist.barrier()
print(f"rank {rank}: {path}", flush=True)
dist.destroy_process_group()

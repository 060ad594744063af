"""A tiny SPMD script the launch tests run under torchrun and through submitit (not a test module).

--mode world: every rank writes rank_<r>.json with what it sees (world, rendezvous, an all_reduce).
--mode fail: rank 1 raises while rank 0 waits in an all_reduce.
--mode resume: `steps` steps, a checkpoint file per step (rank 0); on its first attempt every rank
  sends itself the preemption signal at step `preempt_at` (as Slurm signals every task), then waits;
  a requeued attempt resumes after the latest checkpoint. Each rank appends to log_<r>.txt.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from rlprims.launch import init, parse_args, shutdown


@dataclass
class Args:
    mode: str = "world"
    """world | fail | resume."""
    out_dir: str = ""
    """Where the rank files go."""
    steps: int = 6
    """resume: number of steps."""
    preempt_at: int = 3
    """resume: the step at which the first attempt is preempted."""


def _latest(ckpt_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in ckpt_dir.glob("step-*")]
    return max(steps, default=-1)


@record
def main(args: Args) -> None:
    d = init(seed=7, timeout_s=120)
    out = Path(args.out_dir)
    if args.mode == "world":
        x = torch.tensor([float(d.rank + 1)])
        dist.all_reduce(x)
        info = dict(
            rank=d.rank, world_size=d.world_size, local_rank=d.local_rank,
            local_world_size=d.local_world_size, backend=d.backend, all_reduce=x.item(),
            seeded=torch.rand(3).tolist(), cwd=os.getcwd(),
            env={k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")},
        )
        (out / f"rank_{d.rank}.json").write_text(json.dumps(info))
    elif args.mode == "fail":
        if d.rank == 1:
            time.sleep(1.0)  # rank 0 is inside the all_reduce by now
            raise ValueError("boom from rank 1")
        dist.all_reduce(torch.ones(1))
    elif args.mode == "resume":
        ckpt = out / "ckpt"
        ckpt.mkdir(exist_ok=True)
        log = out / f"log_{d.rank}.txt"
        start = _latest(ckpt) + 1
        with log.open("a") as f:
            f.write(f"start {start}\n")
        for step in range(start, args.steps):
            marker = out / f"preempted_{d.rank}"
            if step == args.preempt_at and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGUSR2)  # what Slurm sends before preempting the job
                time.sleep(60)  # the handler ends this task first
                raise RuntimeError("the preemption signal did not stop the task")
            dist.all_reduce(torch.ones(1))
            if d.is_main:
                (ckpt / f"step-{step}").write_text("ok")
            with log.open("a") as f:
                f.write(f"step {step}\n")
    shutdown(d)


if __name__ == "__main__":
    main(parse_args(Args))

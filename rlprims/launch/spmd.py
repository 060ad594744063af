"""SPMD start-up: one process per device, every process runs the same script (torchrun, Slurm or `python`).

`init` reads the rendezvous variables torchrun (or `rlprims.launch.slurm`) sets, picks the device,
initialises the default process group and seeds every RNG; `shutdown` tears the group down.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rlprims.launch.console import quiet_console

__all__ = ["Dist", "init", "shutdown", "seed_all"]

# Set by torchrun and by rlprims.launch.slurm; RANK / WORLD_SIZE are required together.
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job: what `init` returns."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, env: dict[str, str]) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _read_env(env: dict[str, str]) -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from the environment; (0, 1, 0, 1) when none set."""
    present = [k for k in _RENDEZVOUS if k in env]
    if not present:
        return 0, 1, 0, 1
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(
            f"inconsistent launch environment: {', '.join(present)} set but {', '.join(missing)} missing "
            "(launch with torchrun / rlprims.launch.slurm, or unset them all to run as one process)"
        )
    rank, world = _env_int("RANK", env), _env_int("WORLD_SIZE", env)
    local_rank = _env_int("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
    local_world = _env_int("LOCAL_WORLD_SIZE", env) if "LOCAL_WORLD_SIZE" in env else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}")
    if not 1 <= local_world <= world or not 0 <= local_rank < local_world:
        raise ValueError(
            f"inconsistent launch environment: LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}, "
            f"WORLD_SIZE={world}"
        )
    return rank, world, local_rank, local_world


def seed_all(seed: int) -> None:
    """Seeds python's `random`, numpy's global RNG and torch (CPU and every CUDA device) with `seed`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _expandable_segments(env: dict[str, str]) -> None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user configured the allocator."""
    if "PYTORCH_CUDA_ALLOC_CONF" in env or "PYTORCH_ALLOC_CONF" in env:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # read by vLLM's sleep-mode pool too
    if torch.cuda.is_initialized():  # the allocator has read its configuration already
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def init(*, seed: int, timeout_s: float = 600.0, device: str | None = None) -> Dist:
    """Initialises this process of an SPMD job: device, default process group, RNG seeds.

    Under torchrun (or `python -m rlprims.launch.slurm`) it reads RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and rendezvous through `env://`. Run as a plain
    `python script.py` (none of them set) it forms a group of one through an in-process HashStore (no port,
    so any number of such processes or tests run side by side). A default process group always exists
    afterwards, world size 1 included, so FSDP2 / DCP / all_reduce code needs no special case.

    Device: "cuda" when available (else "cpu"); `device` forces one. On CUDA the process takes device
    LOCAL_RANK (`torch.cuda.set_device`) and the backend is NCCL; on CPU it is gloo. `timeout_s` bounds every
    collective: a rank that dies while the others wait makes them fail after at most that long (torchrun
    and `--kill-on-bad-exit` in rlprims.launch.slurm stop them sooner).

    Console: calls `rlprims.launch.console.quiet_console()` first, so library start-up chatter (vLLM's
    config dump and logs, loading bars, deprecation warnings) is hidden unless RLPRIMS_VERBOSE=1.

    CUDA allocator: unless PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF) is set, turns on PyTorch's
    expandable segments, as verl does: micro-batches of varying sizes otherwise leave the caching allocator
    holding up to ~50 % more than it hands out (an H200 GRPO step of the 0.5B model with 32k-token
    micro-batches: 44.6 GiB allocated, 66.8 GiB reserved, 64.7 GiB on the device; with them 45.4 GiB on
    the device; docs/benchmarks.md). vLLM's sleep-mode pool turns them off for its own allocations and
    back on.

    Seeds python, numpy and torch with `seed` on every rank, so models built next are identical on all
    ranks. vLLM reseeds these RNGs when it creates an engine: call `seed_all` again after `create_engine`
    if the trainer's initialisation must not depend on it.

    For the failing rank's traceback to appear in torchrun's summary, decorate the recipe's `main` with
    `torch.distributed.elastic.multiprocessing.errors.record` (docs/launch.md).

    Raises ValueError on an inconsistent environment (RANK without WORLD_SIZE, RANK >= WORLD_SIZE, ...,
    LOCAL_RANK beyond the visible CUDA devices) and RuntimeError if a default process group already exists.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    quiet_console()  # before vLLM is imported; RLPRIMS_VERBOSE=1 (a recipe's --verbose) keeps it all
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    if dist.is_initialized():
        raise RuntimeError("init: a default process group already exists (call shutdown(dist) first)")
    env = dict(os.environ)
    rank, world, local_rank, local_world = _read_env(env)
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): one process per GPU"
            )
        _expandable_segments(env)
        torch.cuda.set_device(local_rank)
        torch_device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        torch_device, backend = torch.device("cpu"), "gloo"

    timeout = datetime.timedelta(seconds=float(timeout_s))
    if "MASTER_ADDR" in env:
        kwargs = dict(init_method="env://", rank=rank, world_size=world)
        if backend == "nccl":
            kwargs["device_id"] = torch_device  # eager NCCL init: a bad GPU fails here, not later
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    seed_all(seed)
    return Dist(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        device=torch_device,
        backend=backend,
    )


def shutdown(dist_info: Dist) -> None:
    """Destroys the default process group `init` created (after a barrier so no rank leaves early)."""
    if not isinstance(dist_info, Dist):
        raise TypeError(f"shutdown expects the Dist returned by init, got {type(dist_info).__name__}")
    if not dist.is_initialized():
        return
    if dist_info.world_size > 1:
        if dist_info.backend == "nccl":
            dist.barrier(device_ids=[dist_info.local_rank])
        else:
            dist.barrier()
    dist.destroy_process_group()

"""Device meshes: explicit, built from the already-initialized default process group, passed around.

Axis names: "dp" (data-parallel: one engine per dp index) x "tp" (the ranks of one engine's tensor-parallel
group, consecutive global ranks, as `rlprims.rollout.create_engine` lays them out). Training (FSDP2) shards
over all ranks: `fsdp_mesh` gives that 1-D mesh. Every group made here carries an explicit collective
timeout, so a rank that stalls makes the others raise instead of hanging (see docs/parallel.md, Faults).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["build_mesh", "fsdp_mesh"]


def _require_initialized(fn: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{fn} needs an initialized default process group (rlprims.launch.init, or "
            "torch.distributed.init_process_group; world size 1 is fine)"
        )


def build_mesh(*, device_type: str, tp: int = 1, timeout_s: float = 600.0) -> DeviceMesh:
    """A 2-D DeviceMesh (dp, tp) over all ranks; rank r sits at (r // tp, r % tp).

    tp: ranks per inference engine (consecutive ranks share one engine); must divide the world size.
    timeout_s: collective timeout of the "dp" and "tp" groups created here (the world group keeps the
      timeout it was initialized with: pass the same number to rlprims.launch.init).
    device_type: "cpu" (gloo) or "cuda" (nccl); the default group's backend must serve it.
    Collective: every rank must call it, in the same order relative to other group creations.
    """
    _require_initialized("build_mesh")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"tp={tp} does not divide the world size {world}: each engine takes tp consecutive ranks")
    layout = torch.arange(world).view(world // tp, tp)
    timeout = timedelta(seconds=timeout_s)
    rank = dist.get_rank()
    dp_group = tp_group = None
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for col in layout.t().tolist():  # dp groups: ranks with the same tp index
        g = dist.new_group(col, timeout=timeout)
        if rank in col:
            dp_group = g
    for row in layout.tolist():  # tp groups: consecutive ranks
        g = dist.new_group(row, timeout=timeout)
        if rank in row:
            tp_group = g
    return DeviceMesh.from_group(
        [dp_group, tp_group], device_type, mesh=layout, mesh_dim_names=("dp", "tp")
    )


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh ("fsdp",) over all ranks that FSDP2 shards over, for a mesh that covers the world.

    A 1-D mesh is returned as it is. A multi-dimensional mesh (e.g. build_mesh's (dp, tp)) must cover
    every rank; the result wraps the default (world) group, whose timeout is the one the job was
    initialized with.
    """
    _require_initialized("fsdp_mesh")
    if mesh.ndim == 1:
        return mesh
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"mesh covers {mesh.size()} of {dist.get_world_size()} ranks; FSDP2 here shards over all ranks"
        )
    return DeviceMesh.from_group(dist.group.WORLD, mesh.device_type, mesh_dim_names=("fsdp",))

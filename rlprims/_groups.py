"""Which ranks a collective runs over: the one rule every module of rlprims follows.

A group argument is a `ProcessGroup`, a 1-D `DeviceMesh` (e.g. `mesh["dp"]`), or None: the default
(world) group when torch.distributed is initialized, else this process alone. Kept apart from
`rlprims.parallel` so that packages below it (`rlprims.rollout`) share the rule without importing it.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Group", "process_group"]

Group = dist.ProcessGroup | DeviceMesh | None


def process_group(group: Group) -> dist.ProcessGroup | None:
    """The ProcessGroup to reduce over, or None when there is nothing to reduce over (one process)."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"pass a 1-D mesh (e.g. mesh['dp']), got dims {group.mesh_dim_names}")
        group = group.get_group()
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialized")
        return None
    if dist.get_world_size(group) == 1:
        return None
    return dist.group.WORLD if group is None else group

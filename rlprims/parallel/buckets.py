"""Full weights for the inference engine, gathered from FSDP2 shards bucket by bucket.

The recipe wires the stream into the engine (this package never imports rlprims.rollout):

    rollout.update_weights(llm, engine_weights(model, bucket_bytes=1 << 30, dtype=torch.bfloat16))

Every rank gathers (the all-gathers are collective) and passes the full tensors to its own engine; the
ranks of a TP engine pass the same full tensors and vLLM cuts its shard. Peak extra memory: about one
bucket (the gathered tensors of the bucket being consumed; the previous bucket is released first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

__all__ = ["weight_buckets", "engine_weights", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 1 << 30  # 1 GiB: large enough that per-bucket overheads vanish (benchmarks/weight_sync.py)


def _named_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """state_dict names (HF checkpoint names) of the floating-point parameters and persistent buffers,
    each tensor once: a tied lm_head (the embedding's Parameter under a second name) is not repeated."""
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def _comm_device(t: DTensor) -> torch.device:
    if t.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_full(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The full tensor of `t` in `dtype` (cast before the all-gather: bf16 halves the traffic).

    A DTensor sharded as FSDP2 shards (`Shard(0)` on a 1-D mesh) is all-gathered straight into one
    padded buffer (torch.chunk boundaries: every rank holds ceil(n / W) rows but the last ones hold fewer
    or none), and the first n rows are returned. Any other DTensor goes through `full_tensor()`. A
    plain tensor is returned cast (not copied when it already has `dtype`).
    """
    if not isinstance(t, DTensor):
        return t.detach().to(dtype) if dtype is not None else t.detach()
    local = t.to_local().detach()
    if dtype is not None:
        local = local.to(dtype)
    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        full = DTensor.from_local(local, mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False)
        return full.full_tensor()
    world = mesh.size()
    if world == 1:
        return local
    n, rest = t.shape[0], tuple(t.shape[1:])
    chunk = -(-n // world)
    device = _comm_device(t)
    send = torch.empty((chunk, *rest), dtype=local.dtype, device=device)
    send[: local.shape[0]].copy_(local)  # rows past this rank's share stay uninitialized; cut below
    recv = torch.empty((world * chunk, *rest), dtype=local.dtype, device=device)
    dist.all_gather_into_tensor(recv, send, group=mesh.get_group())
    return recv[:n]


def weight_buckets(
    model: nn.Module,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    name_map: Callable[[str], str] | None = None,
) -> Iterator[list[tuple[str, Tensor]]]:
    """Full (gathered) weights of `model` in buckets of at most `bucket_bytes` each.

    Walks the state_dict in order (a layer's tensors stay together, as vLLM needs): floating-point
    parameters and persistent buffers, each tensor once (a tied lm_head is left out: the embedding
    carries it). A bucket holds consecutive tensors whose full sizes in `dtype` sum to <= bucket_bytes;
    a tensor larger than bucket_bytes forms a bucket alone. Each tensor is cast to `dtype` (None: kept)
    on its shard, then all-gathered (FSDP2 DTensors) into a full tensor on the communication device
    (CUDA for a cuda mesh, even with CPU offload). Plain tensors (an unsharded model) are only cast.
    name_map renames each tensor (e.g. to the engine's parameter names); the default keeps the
    state_dict names, which are the HF checkpoint names for a transformers model.

    Collective: every rank of the mesh must consume the iterator to the end, in step; a rank that fails
    or stalls makes the others raise after the group's collective timeout (see build_mesh).
    Memory: the generator holds one bucket; release it (drop your references) before asking for the
    next one, and the peak extra memory stays at about one bucket.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype or None, got {dtype}")
    plan: list[list[tuple[str, Tensor]]] = [[]]
    used = 0
    for name, t in _named_weights(model):
        size = t.numel() * (dtype or t.dtype).itemsize
        if plan[-1] and used + size > bucket_bytes:
            plan.append([])
            used = 0
        plan[-1].append((name, t))
        used += size
    plan = [b for b in plan if b]
    while plan:
        members = plan.pop(0)
        bucket = [(name_map(n) if name_map else n, _gather_full(t, dtype)) for n, t in members]
        del members
        yield bucket
        del bucket  # the caller's reference is its own; ours is gone before the next gather


def engine_weights(
    model: nn.Module,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    name_map: Callable[[str], str] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """The (name, full tensor) pairs of `weight_buckets`, one at a time: the one-shot stream that
    `rlprims.rollout.update_weights(llm, engine_weights(model, dtype=torch.bfloat16))` consumes.

    Holds at most one bucket: each pair is dropped from the bucket as it is handed out, so a consumer
    that copies tensors into its own storage (vLLM does) keeps the extra memory to about one bucket.
    Collective (see weight_buckets): every rank must consume it to the end.
    """
    buckets = weight_buckets(model, bucket_bytes=bucket_bytes, dtype=dtype, name_map=name_map)
    for bucket in buckets:
        bucket.reverse()
        while bucket:
            yield bucket.pop()
        del bucket

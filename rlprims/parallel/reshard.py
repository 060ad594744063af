"""The inference engine's tensor-parallel layout (vLLM's), and DTensor resharding of training weights to it.

vLLM (read from the installed model_executor/layers/linear.py and vocab_parallel_embedding.py) cuts an HF
checkpoint tensor of a Llama/Qwen2-style model for TP rank t of T like this (weights are [out, in]):

* column-parallel, dim 0: q_proj, gate_proj, up_proj (weight and bias): rows [t*n/T, (t+1)*n/T).
* k_proj, v_proj (QKVParallelLinear): with K >= T kv heads, as above; with K < T each kv head is
  replicated over T/K ranks and rank t holds head t // (T/K).
* row-parallel, dim 1: o_proj, down_proj weights: columns [t*n/T, (t+1)*n/T); their biases are whole.
* vocab-parallel, dim 0: embed_tokens, lm_head: the vocabulary V is padded to a multiple of 64, Vp;
  rank t holds rows [t*Vp/T, (t+1)*Vp/T) of the padded table: real rows up to V, zeros after.
* everything else (norms) is replicated.

`engine_tp_slice` is that slicing of a full tensor; `reshard_for_engine` gets the same local shard from a
training DTensor by DTensor redistribution (an all-to-all over the tp axis instead of a full all-gather)
when the layout is a plain even split, and through the full tensor otherwise.

Not needed for `rlprims.rollout.update_weights`, which takes full tensors on every rank of a TP group
(vLLM slices them itself): these are for engines or checks that take pre-cut shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["EngineTPLayout", "engine_tp_layout", "engine_tp_dim", "engine_tp_slice", "reshard_for_engine"]

VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")
_VOCAB = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class EngineTPLayout:
    """What vLLM's TP slicing depends on: the TP size, head counts, head size, vocabulary size."""

    tp_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    vocab_padding: int = VOCAB_PADDING


def engine_tp_layout(hf_config, *, tp_size: int) -> EngineTPLayout:
    """EngineTPLayout from a transformers config (Llama / Qwen2 / Mistral style attributes)."""
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    if heads % tp_size or (kv % tp_size and tp_size % kv):
        raise ValueError(
            f"tp_size={tp_size} must divide num_attention_heads={heads} and divide or be a multiple of "
            f"num_key_value_heads={kv} (as vLLM requires)"
        )
    return EngineTPLayout(tp_size, heads, kv, head_dim, hf_config.vocab_size)


def _module(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def engine_tp_dim(name: str) -> int | None:
    """The tensor dim vLLM splits for this HF checkpoint name (0 column/vocab, 1 row), None if whole."""
    module, leaf = _module(name), name.rsplit(".", 1)[-1]
    if module in _COLUMN or module in _VOCAB:
        return 0
    if module in _ROW:
        return 1 if leaf == "weight" else None
    return None


def _range(name: str, n: int, layout: EngineTPLayout, tp_rank: int) -> tuple[int, int, int]:
    """(start, stop, shard_rows) of rank tp_rank's slice along the split dim; shard_rows >= stop - start
    (the vocab shard is zero-padded to shard_rows)."""
    tp = layout.tp_size
    module = _module(name)
    if module in _VOCAB:
        padded = -(-layout.vocab_size // layout.vocab_padding) * layout.vocab_padding
        per = padded // tp
        start = min(tp_rank * per, n)  # a rank past the real rows holds only padding
        return start, min(tp_rank * per + per, n), per
    if module in ("k_proj", "v_proj") and layout.num_key_value_heads < tp:
        replicas = tp // layout.num_key_value_heads
        per = layout.head_dim
        start = (tp_rank // replicas) * per
        return start, start + per, per
    if n % tp:
        raise ValueError(f"{name}: dim of size {n} does not split into tp_size={tp} equal parts")
    per = n // tp
    return tp_rank * per, (tp_rank + 1) * per, per


def engine_tp_slice(full: Tensor, *, name: str, layout: EngineTPLayout, tp_rank: int) -> Tensor:
    """Rank tp_rank's shard of the full HF tensor `name`, exactly as vLLM cuts it (see module doc).

    Shapes: full [n, ...] (dim 0 split) or [out, n] (dim 1 split) -> the shard; whole tensors unchanged.
    """
    if not 0 <= tp_rank < layout.tp_size:
        raise ValueError(f"tp_rank must be in [0, {layout.tp_size}), got {tp_rank}")
    dim = engine_tp_dim(name)
    if dim is None:
        return full
    start, stop, rows = _range(name, full.shape[dim], layout, tp_rank)
    piece = full.narrow(dim, start, stop - start)
    if stop - start == rows:
        return piece
    pad = list(piece.shape)
    pad[dim] = rows - (stop - start)
    return torch.cat([piece, piece.new_zeros(pad)], dim=dim)


def reshard_for_engine(param: Tensor, mesh: DeviceMesh, *, name: str, layout: EngineTPLayout) -> Tensor:
    """This rank's engine TP shard of a training weight: equal to `engine_tp_slice(full, tp_rank=...)`.

    param: an FSDP2 DTensor (Shard(0) over all ranks) or a full tensor. mesh: build_mesh's (dp, tp)
    mesh with mesh["tp"].size() == layout.tp_size; the tp coordinate of this rank picks the shard.
    With dim 0 divisible by the world size and a plain even split (no vocab padding, no kv-head
    replication), the FSDP2 shard is viewed as (Shard(0), Shard(0)) on (dp, tp) (the same rows, since
    row-major rank order is dp-major) and redistributed to (Replicate(), Shard(dim)): for dim 1 that is an
    all-to-all over tp plus an all-gather over dp, and no rank materializes the full tensor. Otherwise
    the full tensor is gathered and sliced. Collective over the mesh when param is a DTensor.
    """
    if mesh.mesh_dim_names != ("dp", "tp"):
        raise ValueError(f"mesh must have axes ('dp', 'tp') (build_mesh), got {mesh.mesh_dim_names}")
    if mesh["tp"].size() != layout.tp_size:
        raise ValueError(f"mesh has tp={mesh['tp'].size()} but layout.tp_size={layout.tp_size}")
    tp_rank = mesh.get_local_rank("tp")
    if not isinstance(param, DTensor):
        return engine_tp_slice(param.detach(), name=name, layout=layout, tp_rank=tp_rank)
    dim = engine_tp_dim(name)
    world = param.device_mesh.size()
    even = (
        dim is not None
        and param.device_mesh.ndim == 1
        and tuple(param.placements) == (Shard(0),)
        and param.shape[0] % world == 0
        and param.shape[dim] % layout.tp_size == 0
        and _module(name) not in _VOCAB
        and not (_module(name) in ("k_proj", "v_proj") and layout.num_key_value_heads < layout.tp_size)
    )
    if not even:
        full = param.detach().full_tensor()
        return engine_tp_slice(full, name=name, layout=layout, tp_rank=tp_rank)
    on_2d = DTensor.from_local(
        param.to_local().detach(), mesh, (Shard(0), Shard(0)), shape=param.shape, stride=param.stride(),
        run_check=False,
    )
    return on_2d.redistribute(mesh, (Replicate(), Shard(dim))).to_local()

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for HF causal LMs: one group per decoder layer + the root."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from rlprims.parallel.mesh import fsdp_mesh

T = TypeVar("T")

__all__ = ["shard_model", "decoder_layers", "gather_once", "offloaded_to_cpu"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: those whose class is in the HF model's `_no_split_modules`
    (e.g. LlamaDecoderLayer, Qwen2DecoderLayer), in module order. Raises if there are none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder-layer classes in _no_split_modules ({sorted(names)}) "
            "that occur in the model; shard_model expects a transformers PreTrainedModel"
        )
    return layers


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    average_gradients: bool = False,
    activation_checkpointing: bool = False,
    per_layer: bool = True,
) -> nn.Module:
    """Shards `model` in place with FSDP2 over all ranks of `mesh`: each decoder layer (per_layer), then the
    root.

    The sharded parameters keep the model's dtype (fp32 masters); param_dtype (e.g. torch.bfloat16) is
    the dtype of the all-gathered parameters in forward/backward, reduce_dtype that of the gradient
    reduce-scatter (fp32 default: bf16 sums lose precision over many ranks). Parameters become DTensors
    sharded on dim 0 (`Shard(0)`, torch.chunk boundaries) over the 1-D mesh `fsdp_mesh(mesh)`.

    cpu_offload: sharded parameters, gradients and optimizer state live in CPU memory (CPUOffloadPolicy;
      the optimizer step runs on CPU); a model on another device is moved to the CPU first.
    reshard_after_forward: True frees each layer's gathered parameters after its forward and gathers them
      again in backward (ZeRO-3, less memory); False keeps them until backward (ZeRO-2-like, fewer
      all-gathers). The root never reshards after forward (its parameters are used first in backward).
    average_gradients: False (default) *sums* gradients over ranks, the convention of rlprims' loss
      normalizers (`step_loss_normalizers`: each rank divides its loss by the step-wide totals, so the
      sum over ranks equals one big batch). True is torch's default (mean over ranks), for losses
      normalized per rank.

    activation_checkpointing: each decoder layer keeps only its input for the backward and recomputes
      the rest there (torch's composable `checkpoint`, applied before sharding; module names and
      state_dict keys are unchanged). Activation memory per token drops from all of a layer's
      intermediates to its input (≈ 2·hidden bytes in bf16 per layer), for one more forward pass of
      compute (≈ +1/3 of forward + backward). Gradients are identical (tested).

    per_layer: True (default) makes each decoder layer its own FSDP2 unit, gathered and reduced on its
      own (overlapping communication with the neighbouring layers' compute); False makes the whole model
      one unit: one set of FSDP2 hooks per forward and backward instead of one per layer, so less host
      work per micro-batch (a 24-layer toy model on CPU: 145 → 88 ms per micro-batch), but every
      parameter is gathered at once, from the first forward to the end of the backward. Meant for
      models small enough to stay gathered anyway, with `gather_once`.

    Differs from torch's default: gradients summed, not averaged (see average_gradients).
    Returns the same module, now also an FSDPModule (clip_grad_norm_ of torch works on its DTensor grads).
    """
    if isinstance(model, FSDPModule):
        raise ValueError("model is already sharded (an FSDPModule)")
    mesh1d = fsdp_mesh(mesh)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh1d, mp_policy=mp)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh1d.device_type == "cuda")  # pinning needs CUDA
        if any(t.device.type not in ("cpu", "meta") for t in (*model.parameters(), *model.buffers())):
            model.to("cpu")
    layers = decoder_layers(model)
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for layer in layers:
            checkpoint(layer)
    for layer in layers if per_layer else ():
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    if not average_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                # plain SUM collectives: a divide factor alone becomes PREMUL_SUM, which gloo lacks
                m.set_force_sum_reduction_for_comms(True)
    return model


def gather_once(model: nn.Module, micro_batches: Sequence[T], *, enabled: bool = True) -> Iterator[T]:
    """Yields one optimizer step's micro-batches; FSDP2 gathers the parameters once and reduces the
    gradients once for all of them, instead of once per micro-batch.

    For every micro-batch but the last: no gradient reduce-scatter (the unsharded gradients accumulate
    in reduce_dtype, fp32 by default) and no resharding after backward, so the next forward finds the
    parameters gathered. The last backward reduces and reshards as usual; after the last micro-batch
    every FSDP module is resharded, so the optimizer step and the next gather see the same weights.
    Pair it with `shard_model(..., reshard_after_forward=False)`; otherwise each forward still reshards
    and only the reduce-scatters are saved.

    Why: with one rank, or few, FSDP2's per-module host work (casting and copying every parameter in,
    all-gather, copy-out, and the same for the gradients) is most of a micro-batch's CPU time for
    small models (0.5B on an H200: ~0.1 s of 0.19 s; docs/benchmarks.md), and the GPU waits for it.
    Memory: the gathered parameters (2 bytes/param in bf16) and fp32 unsharded gradients (4 bytes/param)
    stay allocated through the step on every rank: use it when that fits (`rlprims.launch.fit_training`
    decides). The gradients equal those of the per-micro-batch path up to fp32 summation order (tested).
    enabled=False yields the micro-batches unchanged (the per-micro-batch path).
    """
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not enabled or not fsdp:
        yield from micro_batches
        return
    last = len(micro_batches) - 1
    try:
        for k, micro_batch in enumerate(micro_batches):
            for m in fsdp:
                m.set_requires_gradient_sync(k == last, recurse=False)
                m.set_reshard_after_backward(k == last, recurse=False)
            yield micro_batch
    finally:
        for m in fsdp:
            m.set_requires_gradient_sync(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
            m.reshard()


def offloaded_to_cpu(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 CPU offload on a GPU mesh: its shards (and gradients) are CPU
    tensors while its process group may reach only the GPU (NCCL), so collectives on them must go through
    the GPU (`clip_sharded_grad_norm_`, `weight_buckets`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) and p.device_mesh.device_type != "cpu"
               and p.to_local().device.type == "cpu" for p in model.parameters())

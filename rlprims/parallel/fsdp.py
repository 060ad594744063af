"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for HF causal LMs: one group per decoder layer + the root."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from rlprims.parallel.mesh import fsdp_mesh

__all__ = ["shard_model", "decoder_layers"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: those whose class is in the HF model's `_no_split_modules`
    (e.g. LlamaDecoderLayer, Qwen2DecoderLayer), in module order. Raises if there are none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder-layer classes in _no_split_modules ({sorted(names)}) that "
            "occur in the model; shard_model expects a transformers PreTrainedModel"
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
) -> nn.Module:
    """Shards `model` in place with FSDP2 over all ranks of `mesh`: each decoder layer, then the root.

    The sharded parameters keep the model's dtype (fp32 masters); param_dtype (e.g. torch.bfloat16) is
    the dtype of the all-gathered parameters in forward/backward, reduce_dtype that of the gradient
    reduce-scatter (fp32 default: bf16 sums lose precision over many ranks). Parameters become DTensors
    sharded on dim 0 (`Shard(0)`, torch.chunk boundaries) over the 1-D mesh `fsdp_mesh(mesh)`.

    cpu_offload: sharded parameters, gradients and optimizer state live in CPU memory (CPUOffloadPolicy;
      the optimizer step runs on CPU); the model must be on CPU or meta before sharding then.
    reshard_after_forward: True frees each layer's gathered parameters after its forward and gathers them
      again in backward (ZeRO-3, less memory); False keeps them until backward (ZeRO-2-like, fewer
      all-gathers). The root never reshards after forward (its parameters are used first in backward).
    average_gradients: False (default) *sums* gradients over ranks, the convention of rlprims' loss
      normalizers (`step_loss_normalizers`: each rank divides its loss by the step-wide totals, so the
      sum over ranks equals one big batch). True is torch's default (mean over ranks), for losses
      normalized per rank.

    Differs from torch's default: gradients summed, not averaged (see average_gradients).
    Returns the same module, now also an FSDPModule (clip_grad_norm_ of torch works on its DTensor grads).
    """
    if isinstance(model, FSDPModule):
        raise ValueError("model is already sharded (an FSDPModule)")
    mesh1d = fsdp_mesh(mesh)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh1d, mp_policy=mp)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    if not average_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                # plain SUM collectives: a divide factor alone becomes PREMUL_SUM, which gloo lacks
                m.set_force_sum_reduction_for_comms(True)
    return model

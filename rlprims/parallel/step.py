"""One optimizer step over the micro-batches of a mini-batch: what every trainer loop does the same way."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from rlprims.parallel.fsdp import offloaded_to_cpu
from rlprims.parallel.guard import guard_init, guard_update

__all__ = ["optimizer_step", "clip_sharded_grad_norm_"]

P = TypeVar("P")


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: Iterable[P],
    loss_fn: Callable[[P], tuple[Tensor, dict[str, float]]],
    *,
    max_grad_norm: float,
    step: int = -1,
) -> tuple[float, dict[str, float]]:
    """Accumulates the gradient of every micro-batch, clips the global norm, steps and zeroes the gradient.

        for part in parts:  loss, metrics = loss_fn(part);  loss.backward()
        g ← g · min(1, max_grad_norm / ‖g‖)  (all parameters, all ranks: FSDP2's DTensor norm is global)

    loss_fn returns the micro-batch's loss, already divided by the step-wide normalizer (see
    `rlprims.ops.reduce`), and Python-float metrics; the metrics of all parts are summed. Under FSDP2
    every rank must run as many parts (`step_micro_batches` plans them so).

    Non-finite guard: when the summed loss or the gradient norm is NaN or inf on any rank, the gradient
    is dropped and FloatingPointError is raised on every rank, naming `step` (the caller's step number,
    for the message), the tensor and the ranks (`rlprims.parallel.guard`): a NaN never reaches
    `optimizer.step()`, so the weights and the last checkpoint stay finite. One small all-reduce.
    Returns (‖g‖ before clipping, {name: Σ_parts metric}).
    """
    totals: dict[str, float] = defaultdict(float)
    loss_sum = torch.zeros(())
    for part in parts:
        loss, metrics = loss_fn(part)
        loss.backward()
        loss_sum = loss_sum.to(loss.device) + loss.detach()
        for name, value in metrics.items():
            totals[name] += float(value)
    params = list(model.parameters())
    if offloaded_to_cpu(model):  # FSDP2 CPU offload on GPUs: only the norm's scalar goes through the GPU
        comm = torch.device(params[0].device_mesh.device_type, torch.cuda.current_device())
        norm = clip_sharded_grad_norm_(params, max_grad_norm, device=comm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    try:
        guard_update(guard_init(), {"loss": loss_sum, "grad_norm": norm}, step=step, max_consecutive_skips=0,
                     device=norm.device)
    except FloatingPointError:
        optimizer.zero_grad(set_to_none=True)
        raise
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item(), dict(totals)


def clip_sharded_grad_norm_(
    parameters: Iterable[nn.Parameter], max_norm: float, *, device: torch.device
) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` for FSDP2-sharded gradients whose shards may live on the CPU.

        ‖g‖ = sqrt(Σ_ranks Σ_shards Σ g²)   (one fp32 scalar all-reduced on `device`)
        g ← g · min(1, max_norm / (‖g‖ + 1e-6))   (in place, on each shard where it lives)

    With FSDP2's CPU offload the shards are CPU tensors while the process group may reach only the GPU
    (NCCL): torch's DTensor norm would all-reduce a CPU tensor there and fail. Here only the scalar
    travels, on `device`. Every gradient must be a DTensor sharded (Shard placements) over one mesh.
    Returns ‖g‖ before clipping, on `device`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    meshes = {g.device_mesh for g in grads if isinstance(g, DTensor)}
    if len(meshes) != 1 or not all(isinstance(g, DTensor) and all(pl.is_shard() for pl in g.placements)
                                   for g in grads):
        raise ValueError("clip_sharded_grad_norm_ needs every gradient to be a DTensor sharded over one mesh "
                         "(FSDP2); use torch.nn.utils.clip_grad_norm_ otherwise")
    (mesh,) = meshes
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        squares += g.to_local().float().pow(2).sum().to(device)
    torch.distributed.all_reduce(squares, group=mesh.get_group())
    norm = squares.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = g.to_local()
        local.mul_(coef.to(local.device, local.dtype))
    return norm

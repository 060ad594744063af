"""Fused Triton kernels for a model's memory-bound layers, from Liger Kernel (an optional dependency).

    from rlprims.models.fused import use_liger_kernels
    model = use_liger_kernels(AutoModelForCausalLM.from_pretrained(path, ...).cuda())   # before sharding

Replaces, in place, each decoder layer's RMSNorms (and the final norm), its SwiGLU MLP's SiLU · up and the
rotary embedding with Liger's fused forward + backward kernels (Hsu et al. 2024, arXiv:2410.10989), as
verl's `use_liger`. What the eager model spends on these elementwise kernels (fp32 upcasts, one kernel
per op) is most of a small model's update time on a GPU (docs/benchmarks.md: the 0.5B update is ~30 %
MFU, its matmuls run at ~90 %). The LM head is left alone: rlprims' own fused log-prob kernel reads the
hidden states (`rlprims.kernels`), so Liger's fused-linear cross-entropy is not used.

Liger patches transformers' modeling module of the model's type as well (the rotary function and the
RMSNorm / MLP classes, for models created later in the process), as `apply_liger_kernel_to_<type>` does.
CUDA only: Liger's kernels do not run on CPU (nor under TRITON_INTERPRET). Needs `pip install
liger-kernel` (0.8 or newer, for transformers 5).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["load_model", "use_liger_kernels", "liger_model_types", "liger_supports"]

_KERNELS = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def _liger():
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as e:
        raise ImportError(f"Liger kernels need the liger-kernel package: pip install liger-kernel ({e})") \
            from None
    return monkey_patch


def liger_model_types() -> list[str]:
    """The transformers model types Liger has kernels for (config.model_type values)."""
    return sorted(_liger().MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_supports(model_type: str) -> bool:
    """Whether liger-kernel is installed and has kernels for `model_type` (what `--use-liger` unset, on
    CUDA, turns on; `rlprims.launch.fit_to_device`). An installed liger-kernel that fails to import (say,
    against another Triton) counts as absent, with a warning: an optional speed-up must not stop a run."""
    try:
        return model_type in _liger().MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    except Exception as e:  # noqa: BLE001 - whatever a broken install raises
        warnings.warn(f"liger-kernel is installed but failed to import ({type(e).__name__}: {e}); the "
                      "trainer runs without its fused kernels (fix the install, or pass --use-liger false)",
                      stacklevel=2)
        return False


def use_liger_kernels(model: nn.Module) -> nn.Module:
    """Patches `model` (a transformers model, not yet sharded) in place with Liger's RMSNorm, RoPE and
    SwiGLU kernels; returns it. Raises on a model that is sharded already, on CPU, or of a type Liger
    has no kernels for (naming the supported ones)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        raise ValueError("use_liger_kernels: apply it before shard_model (the model is an FSDPModule)")
    monkey_patch = _liger()
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"use_liger_kernels: Liger's Triton kernels run on CUDA only; the model is on "
                         f"{device} (drop --use-liger on CPU)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(f"use_liger_kernels: Liger has no kernels for model type {model_type!r}; it has "
                         f"{', '.join(liger_model_types())}")
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in _KERNELS.items() if k in accepted})
    return model


def load_model(path: str, *, dtype: torch.dtype, device: torch.device, use_liger: bool = False,
               auto_class: Any = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """A transformers model as the recipes train it: loaded with rlprims' packed attention
    (`register_packed_attention`), moved to `device`, and with `use_liger` patched by `use_liger_kernels`.
    auto_class: the transformers Auto class (default AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    from rlprims.models.packed import register_packed_attention

    auto_class = auto_class or AutoModelForCausalLM
    model = auto_class.from_pretrained(path, dtype=dtype, attn_implementation=register_packed_attention(),
                                       **from_pretrained_kwargs).to(device)
    return use_liger_kernels(model) if use_liger else model


def _is_patched(module: nn.Module) -> bool:
    """Whether `module`'s forward is Liger's (for tests and checks)."""
    forward = getattr(module.forward, "__func__", module.forward)
    return getattr(forward, "__module__", "").startswith("liger_kernel.")

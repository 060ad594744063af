"""Input checks shared by the ops. Every failure is a ValueError that names the argument and its shape.

These run eagerly on every call: RL bugs are silent (a wrong mask trains, just badly), so the ops refuse
malformed input rather than broadcast it. The checks that need the data (finiteness) cost one reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _desc(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def check_tensor(name: str, t: object, *, ndim: int | None = None, floating: bool = False) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {_desc(t)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {_desc(t)}")
    return t


def check_mask(name: str, mask: object, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """A mask must be bool and exactly `shape` (no broadcasting: a [B, 1] mask is almost always a bug)."""
    check_tensor(name, mask)
    assert isinstance(mask, Tensor)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {_desc(mask)}; use mask.bool() if intended")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {_desc(mask)}")
    return mask


def check_same_shape(**tensors: Tensor) -> torch.Size:
    """All named tensors are floating point and share one shape; returns it."""
    items = list(tensors.items())
    for name, t in items:
        check_tensor(name, t, floating=True)
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
                "they must match"
            )
    return ref.shape


def check_finite(name: str, t: Tensor, mask: Tensor | None = None) -> None:
    """Rejects NaN/inf (only where `mask` is True, when given: padding may hold anything)."""
    vals = t[mask] if mask is not None else t
    if not bool(torch.isfinite(vals).all()):
        bad = int((~torch.isfinite(vals)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf), {_desc(t)}")


def check_group_size(batch: int, group_size: object, *, min_size: int = 1) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size}, got {group_size}")
    if batch % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the batch size B={batch}; "
            "groups are contiguous rows of group_size"
        )
    return group_size


def check_scores(name: str, scores: object, *, batch: int | None = None) -> Tensor:
    """Per-sequence values: floating [B], finite."""
    check_tensor(name, scores, ndim=1, floating=True)
    assert isinstance(scores, Tensor)
    if batch is not None and scores.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {_desc(scores)}")
    check_finite(name, scores)
    return scores


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)

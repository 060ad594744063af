"""Learning-rate schedules: the factor that multiplies the base learning rate, a pure function of the step.

A resumed run recomputes the factor from its step, so there is no scheduler state to checkpoint. Both
functions share one signature, so a recipe picks one from a dict by a flag value. `step` counts the
scheduler steps already taken (0 for the first update), as transformers' `get_*_schedule_with_warmup`
and verl's actor (which steps its scheduler once per training step).
"""

from __future__ import annotations

import math

__all__ = ["constant_lr_factor", "cosine_lr_factor", "is_due"]


def _check(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    for name, value in (("step", step), ("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")


def constant_lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from 0, then constant:  f = step / warmup_steps while step < warmup_steps, else 1.

    transformers' `get_constant_schedule_with_warmup` (verl's `warmup_style=constant`). total_steps and
    min_lr_ratio are checked and otherwise unused (the signature of `cosine_lr_factor`).
    """
    _check(step, warmup_steps, total_steps, min_lr_ratio)
    return step / warmup_steps if step < warmup_steps else 1.0


def cosine_lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from 0, then a cosine from 1 down to min_lr_ratio at total_steps (held after it).

        f = step / w                                          step < w
        f = ρ + (1 − ρ) · ½ (1 + cos(π · min(p, 1))),  p = (step − w) / max(1, total_steps − w)

    w = warmup_steps, ρ = min_lr_ratio. verl's `warmup_style=cosine` (transformers'
    `get_cosine_schedule_with_warmup` with a floor); the same factor as recipes/sft.py.
    """
    _check(step, warmup_steps, total_steps, min_lr_ratio)
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def is_due(step: int, *, every: int, last: int) -> bool:
    """Whether a periodic action (checkpoint, validation) runs after `step` (1-based) of `last` steps.

    every > 0: every `every` steps and after the last; every = 0: only after the last; every < 0: never
    (a recipe's `--save-every -1`: no checkpoints).
    """
    for name, value in (("step", step), ("every", every), ("last", last)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if every < 0:
        return False
    return step == last or (every > 0 and step % every == 0)

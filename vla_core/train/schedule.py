"""Learning-rate schedule: linear warmup, then cosine decay to a floor (nanoGPT style).

The schedule is a pure function of the optimizer step, so resuming needs nothing but the step counter
(no scheduler object whose state could drift, and no accelerate wrapper that would step it once per
process).
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses step 0).

    Warmup: (step + 1) / warmup * base_lr, so the very first update is not a no-op (lr 0 would make the
    first-step "every trainable parameter moved" check meaningless).
    Then cosine from base_lr down to min_lr_ratio * base_lr at total_steps, constant afterwards.
    """
    if base_lr < 0 or total_steps <= 0:
        raise ValueError(f"lr_at: need base_lr >= 0 and total_steps > 0, got {base_lr}, {total_steps}")
    min_lr = base_lr * min_lr_ratio
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def set_lr(optimizer, step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Set every param group's lr (scaled by the group's `lr_scale`, default 1); returns the base value."""
    lr = lr_at(step, base_lr, warmup_steps, total_steps, min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr

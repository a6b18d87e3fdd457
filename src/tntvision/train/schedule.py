"""The learning-rate schedule: linear warm-up, then cosine decay, per step or following a time budget."""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import TrainConfig

__all__ = ["lr_schedule", "schedule_for"]


def lr_schedule(
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float,
    min_lr: float,
    time_budget_s: float = 0.0,
) -> Callable[[int, float], float]:
    """``lr_at(step, elapsed_seconds)``: linear warm-up to ``peak``, then cosine decay to ``min_lr``.

    torch's schedulers count steps only; this one may also follow a time budget (``time_budget_s`` > 0):
    progress is then the larger of the step fraction and the fraction of the budget used. Warm-up ramps
    towards the cosine's value at the current progress (``peak`` when counting steps), so the rate stays
    continuous when a short budget has moved the cosine on during warm-up.
    """
    warm_frac = warmup_steps / max(total_steps, 1)

    def lr_at(step: int, elapsed: float) -> float:
        p = step / max(total_steps, 1)
        if time_budget_s > 0:
            p = max(p, elapsed / time_budget_s)
        q = min(max((p - warm_frac) / max(1.0 - warm_frac, 1e-12), 0.0), 1.0)  # progress along the cosine
        lr = min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))
        if step < warmup_steps:
            return warmup_lr + (lr - warmup_lr) * step / warmup_steps
        return lr

    return lr_at


def schedule_for(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int, float], float]:
    """The schedule ``cfg`` describes: ``cfg.epochs`` epochs, its warm-up, and its time budget if
    ``sched.by_time`` (a run then depends on the machine's speed and is not bit-for-bit reproducible)."""
    s = cfg.sched
    return lr_schedule(
        peak=cfg.scaled_lr,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(s.warmup_epochs * steps_per_epoch),
        warmup_lr=s.warmup_lr,
        min_lr=s.min_lr,
        time_budget_s=cfg.time_budget * 60.0 if s.by_time else 0.0,
    )

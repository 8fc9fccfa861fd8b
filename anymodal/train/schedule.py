"""The learning-rate schedule of every trainer: linear warmup, then cosine (or linear / constant) decay
to a floor.

`lr_factor(step, warmup, progress, ...)` is the multiplier of the peak lr; `decay_progress` says how
far the decay is, from the step count and, for a time budget, the clock. Both are pure functions, so a
resumed run finds its lr from its step alone.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, warmup: int, progress: float, min_ratio: float = 0.1, kind: str = "cosine") -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): (step + 1) / warmup for the first
    `warmup` steps, times the decay from 1 down to `min_ratio` at `progress` (its share done, clipped
    to [0, 1]); `kind="constant"` has no decay."""
    warm = (step + 1) / warmup if step < warmup else 1.0
    if kind == "constant":
        return warm
    t = min(1.0, max(0.0, progress))
    shape = 0.5 * (1.0 + math.cos(math.pi * t)) if kind == "cosine" else 1.0 - t
    return warm * (min_ratio + (1.0 - min_ratio) * shape)


def decay_progress(step: int, warmup: int, total: int, elapsed_s: float = 0.0, budget_s: float = 0.0) -> float:
    """How far the decay is at `step`: the steps after warmup over those planned (`total` steps in
    all), or with a time budget (`budget_s` > 0) the share of it spent, whichever is further."""
    progress = (step - warmup) / max(1, total - warmup)
    if budget_s > 0:
        progress = max(progress, elapsed_s / budget_s)
    return progress

"""Learning-rate schedule: linear warmup, then cosine (or linear / constant) decay to a floor.

`WarmupCosine` is a picklable callable (plain attributes only), used as the `lr_lambda` of a
`torch.optim.lr_scheduler.LambdaLR`, so DeepSpeed saves and restores the scheduler with its
checkpoint and a resumed run continues on the same curve.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


class WarmupCosine:
    """Multiplier of the peak lr at optimizer step `s` (0-based): warmup, then decay to `min_ratio`."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1, kind: str = "cosine"):
        self.warmup = max(0, int(warmup))
        self.total = max(1, int(total))
        self.min_ratio = float(min_ratio)
        self.kind = kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)  # 0 -> 1 over the decay phase
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.kind == "cosine" else 1.0 - t
        return self.min_ratio + (1.0 - self.min_ratio) * shape

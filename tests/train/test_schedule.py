"""The one lr schedule of the three trainers: linear warmup, then cosine (or linear / constant) decay."""

from __future__ import annotations

import math

import pytest

from anymodal.train.schedule import decay_progress, lr_factor


def lm_factor(step: int, warmup: int = 10, total: int = 110, min_ratio: float = 0.1, kind: str = "cosine") -> float:
    """How the LM trainer uses it: the decay runs from the end of warmup to the last step."""
    return lr_factor(step, warmup, decay_progress(step, warmup, total), min_ratio, kind)


def test_warmup_then_cosine_to_the_floor():
    assert [lm_factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # (step + 1) / warmup, exactly
    assert lm_factor(10) == 1.0  # the decay starts at the peak
    assert lm_factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lm_factor(60) == pytest.approx(0.55)  # half way down
    assert lm_factor(110) == pytest.approx(0.1) and lm_factor(500) == pytest.approx(0.1)  # and it stays there
    assert lm_factor(50, warmup=0, total=100, min_ratio=0.0, kind="linear") == pytest.approx(0.5)
    assert lm_factor(3, warmup=5, kind="constant") == pytest.approx(0.8) and lm_factor(80, warmup=5, kind="constant") == 1.0
    assert lm_factor(0, warmup=0) == 1.0  # no warmup: the peak from the first step


def test_time_budget_moves_the_decay_on():
    # tokenizer trainers with max_minutes: the decay follows whichever of steps and minutes runs out first
    assert decay_progress(20, 10, 10**6, elapsed_s=60.0, budget_s=120.0) == 0.5
    assert decay_progress(20, 10, 30, elapsed_s=60.0, budget_s=120.0) == 0.5  # 10 of 20 steps: also half
    assert decay_progress(25, 10, 30, elapsed_s=60.0, budget_s=120.0) == 0.75
    assert decay_progress(20, 10, 30, elapsed_s=500.0) == 0.5  # no budget: the clock does not count
    assert lr_factor(20, 10, decay_progress(20, 10, 10**6, 120.0, 120.0), 0.1) == pytest.approx(0.1)
    # the image tokenizer decays over the whole run and multiplies its warmup in
    assert lr_factor(4, 10, decay_progress(4, 0, 100), 0.05) == pytest.approx(
        0.5 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.04))))

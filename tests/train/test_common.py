"""Shared trainer helpers: the progress bar follows the time budget when there is one."""

from __future__ import annotations

from anymodal.train.common import BudgetBar


def test_budget_bar_counts_seconds_with_a_budget_and_steps_without():
    timed = BudgetBar(steps=100000, max_minutes=0.5, step=0, elapsed=3.0, desc="t")
    assert timed.bar.total == 30 and timed.bar.n == 3
    timed.set_postfix(psnr="27.1")
    timed.update(step=40, elapsed=12.4, loss="0.1")
    assert timed.bar.n == 12 and timed.bar.postfix == "step=40, loss=0.1, psnr=27.1"
    timed.update(step=90, elapsed=99.0)  # past the budget: the bar stops at its end
    assert timed.bar.n == 30
    stepped = BudgetBar(steps=50, max_minutes=0, step=5, elapsed=0.0, desc="s")
    stepped.update(step=9, elapsed=1.0, loss="2.0")
    assert stepped.bar.total == 50 and stepped.bar.n == 9 and stepped.bar.postfix == "loss=2.0"

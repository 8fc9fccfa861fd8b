"""The trainers' progress bar follows the time budget when there is one, the steps otherwise."""

from __future__ import annotations

from anymodal.train.progress import ProgressBar


def test_progress_bar_counts_seconds_with_a_budget_and_steps_without():
    timed = ProgressBar(steps=100000, step=0, desc="t", budget_minutes=0.5, elapsed=3.0)
    assert timed.bar.total == 30 and timed.bar.n == 3
    timed.set_postfix(psnr="27.1")
    timed.update(step=40, elapsed=12.4, loss="0.1")
    assert timed.bar.n == 12 and timed.bar.postfix == "step=40, loss=0.1, psnr=27.1"
    timed.update(step=90, elapsed=99.0)  # past the budget: the bar stops at its end
    assert timed.bar.n == 30
    timed.set_total(500)  # a bar over seconds keeps its end
    assert timed.bar.total == 30
    stepped = ProgressBar(steps=50, step=5, desc="s")
    stepped.update(step=9, elapsed=1.0, loss="2.0")
    assert stepped.bar.total == 50 and stepped.bar.n == 9 and stepped.bar.postfix == "loss=2.0"
    stepped.set_total(40)  # the LM's re-planned last step
    assert stepped.bar.total == 40

"""The trainers' progress bar follows the share of the run done when there is a time budget (steps
or minutes, whichever ends the run first), the steps otherwise."""

from __future__ import annotations

from anymodal.train.progress import SHARE, ProgressBar


def test_progress_bar_counts_the_run_share_with_a_budget_and_steps_without():
    timed = ProgressBar(steps=100000, step=0, desc="t", budget_minutes=0.5, elapsed=3.0)  # the clock ends it
    assert timed.bar.total == SHARE and timed.bar.n == SHARE // 10
    timed.set_postfix(psnr="27.1")
    timed.update(step=40, elapsed=12.4, loss="0.1")
    assert timed.bar.n == round(SHARE * 12.4 / 30) and timed.bar.postfix == "step=40, loss=0.1, psnr=27.1"
    timed.update(step=90, elapsed=99.0)  # past the budget: the bar stops at its end
    assert timed.bar.n == SHARE
    timed.set_total(500)  # a budgeted bar keeps its end
    assert timed.bar.total == SHARE
    capped = ProgressBar(steps=200, step=0, desc="c", budget_minutes=1.0)  # the step cap ends it first
    capped.update(step=150, elapsed=6.0)
    assert capped.bar.n == round(SHARE * 0.75)
    capped.update(step=200, elapsed=8.0)
    assert capped.bar.n == SHARE
    stepped = ProgressBar(steps=50, step=5, desc="s")
    stepped.update(step=9, elapsed=1.0, loss="2.0")
    assert stepped.bar.total == 50 and stepped.bar.n == 9 and stepped.bar.postfix == "loss=2.0"
    stepped.set_total(40)  # the LM's re-planned last step
    assert stepped.bar.total == 40

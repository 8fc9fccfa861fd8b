"""The wall-clock step budget: plans from measured step times, both ways, with evaluations and a reserve."""

from __future__ import annotations

from anymodal.train.budget import StepBudget


def _steps(b: StepBudget, first: int, last: int, t0: float, per_step: float) -> float:
    t = t0
    for s in range(first, last + 1):
        t += per_step
        b.step_done(s, t)
    return t


def test_plans_from_the_measured_rate_and_keeps_to_the_cap():
    b = StepBudget(deadline=100.0, cap=1000)
    assert b.last_step(0, 0.0, current=1000) == 1000  # nothing measured: keep the plan
    b.step_done(1, 5.0)  # the first step (allocations) is never part of the rate
    assert b.last_step(1, 5.0, current=1000) == 1000
    t = _steps(b, 2, 10, 5.0, 0.5)  # 0.5 s per step from here on
    assert b.seconds_per_step() == 0.5
    assert b.last_step(10, t, current=1000) == 10 + int((100.0 - t) / 0.5)
    b.cap = 50
    assert b.last_step(10, t, current=1000) == 50  # never past the configured steps
    assert b.last_step(10, 120.0, current=50) == 10  # out of time: stop now


def test_the_plan_grows_again_when_the_machine_speeds_up():
    b = StepBudget(deadline=200.0, cap=10_000, window=10)
    t = _steps(b, 1, 20, 0.0, 2.0)  # a slow start (a neighbour's job)
    slow = b.last_step(20, t, current=10_000)
    t = _steps(b, 21, 40, t, 0.5)  # the machine frees up
    fast = b.last_step(40, t, current=slow)
    assert slow == 20 + int((200.0 - 40.0) / 2.0)
    assert fast == 40 + int((200.0 - t) / 0.5) and fast > slow


def test_evaluations_are_planned_apart_and_the_reserve_is_kept():
    b = StepBudget(deadline=100.0, cap=10_000)
    t = _steps(b, 1, 10, 0.0, 0.5)
    t += 3.0  # a 3 s task evaluation after step 10, every 10 steps
    b.evaluated(3.0, every=10)
    t = _steps(b, 11, 20, t, 0.5)
    assert b.seconds_per_step() == 0.5  # the evaluation is not in the step rate ...
    assert b.last_step(20, t, current=0) == 20 + int((100.0 - t) / (0.5 + 3.0 / 10))  # ... but in the plan
    b.reserve = 10.0
    assert b.last_step(20, t, current=0) == 20 + int((90.0 - t) / (0.5 + 3.0 / 10))

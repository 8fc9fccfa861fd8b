"""Wall-clock budgets: how many optimizer steps fit in the minutes left (`max_minutes`).

A budgeted run should end when its minutes are up, not earlier and not later, on a machine whose
speed is not known in advance and changes while the run goes on (a shared CPU, a GPU with a warm-up).
`StepBudget` re-plans the last step after every step:

- the time per step is measured over the recent steps as *wall* time between step ends, so every
  cost that recurs with the steps (logging, checkpoint saves, val-loss passes) is in it;
- periodic task evaluations are the exception: long and rare, they would make the windowed rate
  jump, so their time is taken out of the rate and planned on its own (`every` steps, each as long
  as the last one measured);
- a reserve is kept for what happens once after the last step (the final checkpoint, plots);
- the plan may move up or down: an early slow phase (start-up, a neighbour's job) does not cut
  the run for good. The first step (allocations, thread pools, kernel builds) is never in the rate.
"""

from __future__ import annotations

from collections import deque


class StepBudget:
    def __init__(self, deadline: float, cap: int, window: int = 40):
        """deadline: the clock time (`time.perf_counter()`) the run must end by; cap: the configured steps."""
        self.deadline = deadline
        self.cap = cap
        self.marks: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (step, clock minus eval time)
        self.eval_seconds = 0.0  # time spent in periodic evaluations so far
        self.eval_every = 0
        self.last_eval = 0.0  # duration of the most recent evaluation
        self.reserve = 0.0  # seconds kept for after the last step

    def step_done(self, step: int, now: float) -> None:
        self.marks.append((step, now - self.eval_seconds))

    def evaluated(self, seconds: float, every: int) -> None:
        """An evaluation that runs every `every` steps just took `seconds`."""
        self.eval_seconds += seconds
        self.eval_every, self.last_eval = every, seconds

    def seconds_per_step(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None

    def last_step(self, done: int, now: float, current: int) -> int:
        """The last step that fits (between `done` and `cap`); `current` while nothing is measured yet."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return current
        left = self.deadline - now - self.reserve
        if self.eval_every:
            per_step += self.last_eval / self.eval_every  # evaluations spread over the steps they follow
        more = int(max(0.0, left) // per_step) if per_step > 0 else self.cap
        return max(done, min(self.cap, done + more))

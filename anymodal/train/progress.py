"""The trainers' progress bar (tqdm, on stderr): over steps, or, with a time budget, over the share
of the run done.

With a time budget (the tokenizer trainers' `max_minutes`) a run ends at its step cap or when its
minutes are up, whichever comes first. The bar then counts the share of the run done, the larger of
the shares of steps and of minutes, and shows the step in its postfix, so its ETA is that of
whichever ends the run: neither "27:41:04" from a step cap the clock ends first, nor minutes
left after the steps run out. The LM trainer plans its last step from the budget instead, and
moves the bar's end with `set_total`.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from .schedule import decay_progress

SHARE = 1000  # a budgeted bar's units: thousandths of the run


class ProgressBar:
    def __init__(self, steps: int, step: int, desc: str, budget_minutes: float = 0.0, elapsed: float = 0.0,
                 disable: bool = False):
        self.steps = steps
        self.budget = float(budget_minutes) * 60.0
        self.extra: dict = {}  # postfix fields that stay until replaced (e.g. the last val PSNR)
        # redraw twice a second on a terminal; in a log file a line every 30 s is plenty
        common = dict(desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr,
                      mininterval=0.5 if sys.stderr.isatty() else 30.0)
        if self.budget > 0:
            self.bar = tqdm(total=SHARE, initial=self._share(step, elapsed),
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
                            **common)
        else:
            self.bar = tqdm(total=steps, initial=step, unit="step", **common)

    def _share(self, step: int, elapsed: float) -> int:
        # the trainers' own measure of how far the run is (it ends their cosine and their loop)
        return round(SHARE * min(1.0, decay_progress(step, 0, self.steps, elapsed, self.budget)))

    def update(self, step: int, elapsed: float, **postfix) -> None:
        """Step `step` is done, `elapsed` seconds into the budget; `postfix` shows until the next update."""
        if self.budget > 0:
            self.bar.update(max(0, self._share(step, elapsed) - self.bar.n))
            postfix = {"step": step, **postfix}
        else:
            self.bar.update(max(0, step - self.bar.n))
        self.bar.set_postfix(ordered_dict={**postfix, **self.extra}, refresh=False)

    def set_total(self, steps: int) -> None:
        """The last step moved (a re-planned time budget); a budgeted bar keeps its end."""
        if self.budget <= 0:
            self.bar.total = steps

    def set_postfix(self, **fields) -> None:
        self.extra.update(fields)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()

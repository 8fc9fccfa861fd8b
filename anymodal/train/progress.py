"""The trainers' progress bar (tqdm, on stderr): over steps, or over the time budget when one is set.

With a budget that ends training by the clock (the tokenizer trainers' `max_minutes`), the step count
is only a cap, so the bar counts seconds of the budget and shows the step in its postfix: no
"27:41:04" ETAs computed from a step cap the run will never reach. The LM trainer plans its last
step from the budget instead, and moves the bar's end with `set_total`.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class ProgressBar:
    def __init__(self, steps: int, step: int, desc: str, budget_minutes: float = 0.0, elapsed: float = 0.0,
                 disable: bool = False):
        self.budget = float(budget_minutes) * 60.0
        self.extra: dict = {}  # postfix fields that stay until replaced (e.g. the last val PSNR)
        # redraw twice a second on a terminal; in a log file a line every 30 s is plenty
        common = dict(desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr,
                      mininterval=0.5 if sys.stderr.isatty() else 30.0)
        if self.budget > 0:
            self.bar = tqdm(total=round(self.budget), initial=min(round(elapsed), round(self.budget)), unit="s",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]",
                            **common)
        else:
            self.bar = tqdm(total=steps, initial=step, unit="step", **common)

    def update(self, step: int, elapsed: float, **postfix) -> None:
        """Step `step` is done, `elapsed` seconds into the budget; `postfix` shows until the next update."""
        if self.budget > 0:
            self.bar.update(max(0, min(round(elapsed), round(self.budget)) - self.bar.n))
            postfix = {"step": step, **postfix}
        else:
            self.bar.update(max(0, step - self.bar.n))
        self.bar.set_postfix(ordered_dict={**postfix, **self.extra}, refresh=False)

    def set_total(self, steps: int) -> None:
        """The last step moved (a re-planned time budget); a bar over seconds keeps its end."""
        if self.budget <= 0:
            self.bar.total = steps

    def set_postfix(self, **fields) -> None:
        self.extra.update(fields)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()

"""Training metrics: one JSON object per line (the LM's `RUN/metrics.jsonl`, the tokenizer trainers'
logs), written by rank 0.

On resume the records after the checkpoint's step are dropped (they belong to steps that will be
run again), so the file always reads as one uninterrupted run.

A `sink` (the LM trainer passes DeepSpeed's `engine.monitor.write_events`: TensorBoard, Weights &
Biases, CSV) receives every record as well, as `monitor_events(record)`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path

from ..fileio import write_atomic

Event = tuple[str, float, int]  # (name, value, step): a DeepSpeed monitor event


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _clean(v):
    """JSON has no NaN/inf: write them as strings so the line stays parseable."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def monitor_events(record: dict, prefix: str = "Train") -> list[Event]:
    """A record as monitor events `(f"{prefix}/{key}", value, record["step"])`: numbers only (a
    bool as 0/1; None, strings and lists are left out), nested dicts flattened with "/", so
    `{"step": 9, "loss": 2.1, "tasks": {"t2i_accuracy": 0.5}}` gives `("Train/loss", 2.1, 9)` and
    `("Train/tasks/t2i_accuracy", 0.5, 9)`. A record without an integer step gives none."""
    step = record.get("step")
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        return []
    out: list[Event] = []

    def add(name: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                add(f"{name}/{k}", x)
        elif isinstance(v, bool):
            out.append((name, int(v), int(step)))
        elif isinstance(v, numbers.Real):
            out.append((name, int(v) if isinstance(v, numbers.Integral) else float(v), int(step)))

    for key, value in record.items():
        if key != "step":
            add(f"{prefix}/{key}", value)
    return out


class MetricsLog:
    def __init__(self, path: str | Path, keep_until_step: int | None = None, enabled: bool = True,
                 sink: Callable[[list[Event]], None] | None = None):
        """keep_until_step: resume point (records with a larger step are dropped); None = new file.
        sink: also called with each record's `monitor_events` (when enabled)."""
        self.path = Path(path)
        self.enabled = enabled
        self.sink = sink
        if not enabled:
            return
        keep = [] if keep_until_step is None else [r for r in read_metrics(self.path)
                                                    if r.get("step", 0) <= keep_until_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(_clean(record)) + "\n")
            self._f.flush()
            events = monitor_events(record) if self.sink is not None else []
            if events:
                self.sink(events)

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Training metrics: one JSON object per line in `RUN/metrics.jsonl`, written by rank 0.

On resume the records after the checkpoint's step are dropped (they belong to steps that will be
run again), so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


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


class MetricsLog:
    def __init__(self, path: str | Path, keep_until_step: int | None = None, enabled: bool = True):
        """keep_until_step: resume point (records with a larger step are dropped); None = new file."""
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        keep = [] if keep_until_step is None else [r for r in read_metrics(self.path)
                                                    if r.get("step", 0) <= keep_until_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(_clean(record)) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            self._f.close()

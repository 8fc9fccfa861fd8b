"""Charts: one drawer (anymodal.train.plot.plot) for every curve anymodal writes, with matplotlib
when it is installed and PIL otherwise."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from anymodal.train.plot import plot_run, plot_series

SERIES = {"loss": [(1, 3.0), (2, 2.5), (3, float("nan")), (4, 1.5)], "mel": [(1, 1.0), (4, 0.8)]}


def _drawn(path) -> Image.Image:
    img = Image.open(path).convert("RGB")
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 3  # more than a blank frame
    return img


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_plot_series_and_run_curves(backend, tmp_path, monkeypatch):
    if backend == "pil":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    else:
        pytest.importorskip("matplotlib")
    plot_series(SERIES, tmp_path / "loss.png", title="codec")
    _drawn(tmp_path / "loss.png")
    plot_series({"loss": [], "x": [(0, float("inf"))]}, tmp_path / "empty.png")  # nothing to draw: still a PNG
    assert Image.open(tmp_path / "empty.png").size[0] > 100
    (tmp_path / "metrics.jsonl").write_text(
        "".join(f'{{"step": {s}, "loss": {5 - s / 10}, "loss_text": {4 - s / 10}}}\n' for s in range(1, 30))
        + '{"step": 29, "val_loss": 2.0}\n{"step": 29, "minutes": 1.0, "tasks": {"t2i_accuracy": 0.5}}\n')
    assert sorted(p.name for p in plot_run(tmp_path)) == ["loss.png", "loss_text.png", "tasks.png"]
    for name in ("loss.png", "loss_text.png", "tasks.png"):
        _drawn(tmp_path / name)


def test_plot_series_goes_through_the_one_chart_drawer(tmp_path, monkeypatch):
    import anymodal.train.plot as plot_mod

    charts = []
    monkeypatch.setattr(plot_mod, "plot", lambda chart, path: charts.append((chart, path)))
    plot_mod.plot_series(SERIES, tmp_path / "loss.png")
    (chart, path), = charts
    assert path == tmp_path / "loss.png" and [ln.label for ln in chart.lines] == ["loss", "mel"]
    assert chart.lines[0].points == [(1.0, 3.0), (2.0, 2.5), (4.0, 1.5)]  # the NaN point left out

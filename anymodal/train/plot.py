"""A run's curves as PNG files: loss per series (total and each modality, train and validation) and,
when the run measured them, the task metrics against minutes (`tasks.png`).

`plot(chart, path)` is anymodal's one chart drawer (the LM run's loss*.png and tasks.png here, the
audio codec trainer's loss.png through `plot_series`): matplotlib when it is installed (the
`plots` extra), otherwise the same chart drawn with PIL (axes, ticks, lines, markers, a legend), so
a run always ends with pictures of its curves. Either way the PNG is written by
`anymodal.data.media.save_png` (atomically).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.media import save_png
from ..modality import MODALITY_NAMES
from .metrics import read_metrics

SERIES = ("loss", *(f"loss_{m}" for m in MODALITY_NAMES))
# task metric -> (legend label, colour); WER is an error rate: lower is better
TASK_LINES = {
    "t2i_accuracy": ("t2i", "#08519c"), "a2i_accuracy": ("a2i", "#6baed6"),
    "caption_accuracy": ("caption", "#238b45"), "grounding_acc50": ("grounding Acc@0.5", "#d94801"),
    "refer_accuracy": ("refer", "#ae017e"), "asr_wer": ("ASR WER (lower is better)", "#525252"),
}


@dataclass
class Line:
    label: str
    points: list[tuple[float, float]]
    colour: str
    width: int = 2
    markers: bool = False


@dataclass
class Chart:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line] = field(default_factory=list)
    ylim: tuple[float, float] | None = None


def _points(records: list[dict], key: str, x: str = "step") -> list[tuple[float, float]]:
    pts = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and isinstance(r.get(x), (int, float)):
            pts.append((float(r[x]), float(v)))
    return pts


def _ema(ys: list[float], alpha: float | None = None) -> list[float]:
    """Exponential moving average; by default smoothing over about 1/20 of the curve."""
    if alpha is None:
        alpha = max(0.0, 1.0 - 20.0 / max(1, len(ys)))
    out, m = [], None
    for y in ys:
        m = y if m is None else alpha * m + (1 - alpha) * y
        out.append(m)
    return out


def loss_chart(records: list[dict], key: str) -> Chart | None:
    train, val = _points(records, key), _points(records, "val_" + key)
    if not train and not val:
        return None
    chart = Chart("total loss" if key == "loss" else f"{key[5:]} loss", "step", "cross-entropy (nats/token)")
    if train:
        chart.lines.append(Line("train", train, "#9ecae1", 1))
        chart.lines.append(Line("train (EMA)", list(zip([x for x, _ in train], _ema([y for _, y in train]))),
                                "#08519c"))
    if val:
        chart.lines.append(Line("val", val, "#d94801", 1, markers=True))
    return chart


def task_chart(records: list[dict]) -> Chart | None:
    """Task metrics (anymodal.train.task_eval) against training minutes."""
    rows = [{"minutes": r["minutes"], **r["tasks"]} for r in records if isinstance(r.get("tasks"), dict)
            and isinstance(r.get("minutes"), (int, float))]
    lines = [Line(label, _points(rows, key, "minutes"), colour, markers=True)
             for key, (label, colour) in TASK_LINES.items()]
    lines = [ln for ln in lines if ln.points]
    if not lines:
        return None
    return Chart("task metrics on val documents", "minutes of training", "accuracy / WER", lines, (0.0, 1.0))


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write `RUN/loss*.png` (and `RUN/tasks.png`) from `RUN/metrics.jsonl`; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    charts = [(key, loss_chart(records, key)) for key in SERIES] + [("tasks", task_chart(records))]
    written = []
    for name, chart in charts:
        if chart is None:
            continue
        path = run_dir / f"{name}.png"
        plot(chart, path)
        written.append(path)
    return written


PALETTE = ("#08519c", "#d94801", "#238b45", "#ae017e", "#525252", "#6baed6")


def plot_series(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "",
                xlabel: str = "step", ylabel: str = "") -> None:
    """One chart of named (x, y) curves (non-finite points dropped), e.g. a trainer's loss history."""
    lines = [Line(name, [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)],
                  PALETTE[i % len(PALETTE)]) for i, (name, pts) in enumerate(series.items())]
    plot(Chart(title, xlabel, ylabel, lines), Path(path))


def plot(chart: Chart, path: Path) -> None:
    """Write `chart` as a PNG: matplotlib when installed, else PIL (lines without points are left out)."""
    chart = replace(chart, lines=[ln for ln in chart.lines if ln.points])
    try:
        _plot_matplotlib(chart, path)
    except ImportError:
        _plot_pil(chart, path)


def _plot_matplotlib(chart: Chart, path: Path) -> None:
    import matplotlib  # here: optional (the `plots` extra), and slow to import; ImportError -> PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (as above)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for ln in chart.lines:
        xs, ys = zip(*ln.points)
        ax.plot(xs, ys, "o-" if ln.markers else "-", color=ln.colour, lw=ln.width, label=ln.label)
    if chart.ylim:
        ax.set_ylim(*chart.ylim)
    ax.set_xlabel(chart.xlabel)
    ax.set_ylabel(chart.ylabel)
    ax.set_title(chart.title)
    ax.grid(alpha=0.3)
    if chart.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    save_png(np.asarray(fig.canvas.buffer_rgba())[..., :3], path)
    plt.close(fig)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _plot_pil(chart: Chart, path: Path, size=(640, 420)) -> None:
    w, h = size
    left, right, top, bottom = 64, 16, 32, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for ln in chart.lines for p in ln.points] or [(0.0, 0.0)]  # no data: an empty frame
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if chart.ylim:
        y0, y1 = chart.ylim
    else:
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        pad = (y1 - y0) * 0.05 or 0.5
        y0, y1 = y0 - pad, y1 + pad

    def xy(x, y):
        y = min(max(y, y0), y1)  # a value off a fixed axis (a WER above 1) sits on its edge
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _nice_ticks(y0, y1):
        _, py = xy(x0, t)
        d.line([left, py, w - right, py], fill="#e5e5e5")
        d.text((4, py - 6), f"{t:.3g}", fill="black")
    for t in _nice_ticks(x0, x1):
        px, _ = xy(t, y0)
        d.line([px, h - bottom, px, h - bottom + 4], fill="black")
        d.text((px - 10, h - bottom + 8), f"{t:g}", fill="black")
    d.text((w // 2 - 40, 8), chart.title, fill="black")
    d.text((w // 2 - 20, h - 16), chart.xlabel, fill="black")
    for i, ln in enumerate(chart.lines):
        if len(ln.points) > 1:
            d.line([xy(x, y) for x, y in ln.points], fill=ln.colour, width=ln.width)
        if ln.markers or len(ln.points) == 1:
            for x, y in ln.points:
                px, py = xy(x, y)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=ln.colour)
        ly = top + 6 + 12 * i  # legend, top right
        d.line([w - right - 200, ly + 5, w - right - 185, ly + 5], fill=ln.colour, width=3)
        d.text((w - right - 180, ly), ln.label, fill="black")
    save_png(np.asarray(img), path)

"""Loss curves as PNG files, one per series (total and each modality), train and validation.

Uses matplotlib when it is installed; otherwise draws the chart with PIL (axes, ticks, the raw
curve in a light colour and an exponential moving average on top), so a run always ends with
pictures of its curves.
"""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import read_metrics

SERIES = ("loss", "loss_text", "loss_image", "loss_audio", "loss_loc")


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    pts = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            pts.append((float(r["step"]), float(v)))
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


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write `RUN/loss*.png` from `RUN/metrics.jsonl`; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for key in SERIES:
        train = _points(records, key)
        val = _points(records, "val_" + key)
        if not train and not val:
            continue
        title = "total loss" if key == "loss" else f"{key[5:]} loss"
        path = run_dir / f"{key}.png"
        try:
            _plot_matplotlib(train, val, title, path)
        except ImportError:
            _plot_pil(train, val, title, path)
        written.append(path)
    return written


def _plot_matplotlib(train, val, title, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="#9ecae1", lw=1, label="train")
        ax.plot(xs, _ema(list(ys)), color="#08519c", lw=2, label="train (EMA)")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="#d94801", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _plot_pil(train, val, title, path: Path, size=(640, 420)) -> None:
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 16, 32, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = train + val
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad

    def xy(x, y):
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
    d.text((w // 2 - 40, 8), title, fill="black")
    d.text((w // 2 - 10, h - 16), "step", fill="black")
    if len(train) > 1:
        xs, ys = zip(*train)
        d.line([xy(x, y) for x, y in train], fill="#9ecae1", width=1)
        d.line([xy(x, y) for x, y in zip(xs, _ema(list(ys)))], fill="#08519c", width=2)
    for x, y in val:
        px, py = xy(x, y)
        d.ellipse([px - 3, py - 3, px + 3, py + 3], fill="#d94801")
    if len(val) > 1:
        d.line([xy(x, y) for x, y in val], fill="#d94801", width=1)
    d.text((w - right - 210, top + 6), "train (light), EMA (dark)" + (", val (orange)" if val else ""), fill="black")
    img.save(path)

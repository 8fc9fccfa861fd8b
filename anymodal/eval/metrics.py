"""The WORLD.md metrics as plain functions, and the aggregator that writes `metrics.json`.

Each check returns numbers for one example; `Metrics` sums them per task, overall and on the
unseen-combination subset, and `Metrics.result()` lays them out under the exact keys of WORLD.md.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

# ---- word error rate ----------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9']+")


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation: what a transcript is compared on."""
    return _WORD.findall(text.lower())


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(errors, reference words) for one transcript; corpus WER = sum errors / sum words."""
    r, h = normalize_words(ref), normalize_words(hyp)
    return edit_distance(r, h), len(r)


def wer(ref: str, hyp: str) -> float:
    e, n = word_errors(ref, hyp)
    return e / n if n else float(e > 0)


# ---- boxes ----------------------------------------------------------------------------------------
def box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in the same units."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


# ---- images and captions ----------------------------------------------------------------------
def _key(obj: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(obj.get(f) for f in fields)


def image_check(truth: list[dict], found: list[dict]) -> dict[str, bool]:
    """Compare the objects a prompt asked for with those `analyse_image` found.

    correct: the set of (colour, shape) equals the prompt's. position / size: the image is correct
    and every object also sits at the asked position (has the asked size); objects are matched by
    (colour, shape), which is unique within a scene.
    """
    want = Counter(_key(o, ("colour", "shape")) for o in truth)
    got = Counter(_key(o, ("colour", "shape")) for o in found)
    correct = want == got
    position = size = False
    if correct:
        by_kind = {_key(o, ("colour", "shape")): o for o in found}
        position = all(by_kind[_key(o, ("colour", "shape"))].get("position") == o.get("position") for o in truth)
        size = all(by_kind[_key(o, ("colour", "shape"))].get("size") == o.get("size") for o in truth)
    return {"correct": correct, "position": position, "size": size}


def caption_correct(truth: list[dict], parsed: list[dict] | None) -> bool:
    """A caption is right when its (size, colour, shape, position) objects equal the truth's."""
    if parsed is None:
        return False
    fields = ("size", "colour", "shape", "position")
    return Counter(_key(o, fields) for o in truth) == Counter(_key(o, fields) for o in parsed)


def refer_correct(text: str, colour: str, shape: str) -> bool:
    """A referring expression is right when it names the object's colour and shape (and no other)."""
    words = normalize_words(text)
    said_colours = {w for w in words if w in COLOURS}
    said_shapes = {w for w in words if w in SHAPES}
    return said_colours == {colour} and said_shapes == {shape}


# The world's vocabulary (WORLD.md); a referring expression is judged on these words only.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")


# ---- aggregation --------------------------------------------------------------------------------
@dataclass
class _Sum:
    total: float = 0.0
    count: float = 0.0

    def add(self, value: float, weight: float = 1.0) -> None:
        self.total += value
        self.count += weight

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


# metric key -> the task whose examples count towards `n`
METRIC_TASKS = {
    "t2i_accuracy": "t2i", "t2i_position_accuracy": "t2i", "t2i_size_accuracy": "t2i",
    "a2i_accuracy": "a2i", "caption_accuracy": "caption",
    "grounding_acc50": "ground", "grounding_miou": "ground",
    "refer_accuracy": "refer", "asr_wer": "asr", "tts_wer": "tts",
}
BPT_MODALITIES = ("text", "image", "audio", "loc")


@dataclass
class Metrics:
    """Accumulates per-example results; `result()` is the metrics.json layout of WORLD.md."""

    sums: dict[str, _Sum] = field(default_factory=dict)
    unseen_sums: dict[str, _Sum] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    unseen_counts: Counter = field(default_factory=Counter)

    def _add(self, key: str, value: float, weight: float, unseen: bool) -> None:
        self.sums.setdefault(key, _Sum()).add(value, weight)
        if unseen:
            self.unseen_sums.setdefault(key, _Sum()).add(value, weight)

    def _count(self, task: str, unseen: bool) -> None:
        self.counts[task] += 1
        if unseen:
            self.unseen_counts[task] += 1

    def add_image(self, task: str, check: dict[str, bool], unseen: bool = False) -> None:
        """task is 't2i' or 'a2i'; check is `image_check(...)`'s result."""
        self._count(task, unseen)
        self._add(f"{task}_accuracy", float(check["correct"]), 1, unseen)
        if task == "t2i":
            self._add("t2i_position_accuracy", float(check["position"]), 1, unseen)
            self._add("t2i_size_accuracy", float(check["size"]), 1, unseen)

    def add_caption(self, correct: bool, unseen: bool = False) -> None:
        self._count("caption", unseen)
        self._add("caption_accuracy", float(correct), 1, unseen)

    def add_ground(self, iou: float, unseen: bool = False) -> None:
        self._count("ground", unseen)
        self._add("grounding_acc50", float(iou >= 0.5), 1, unseen)
        self._add("grounding_miou", float(iou), 1, unseen)

    def add_refer(self, correct: bool, unseen: bool = False) -> None:
        self._count("refer", unseen)
        self._add("refer_accuracy", float(correct), 1, unseen)

    def add_wer(self, task: str, ref: str, hyp: str, unseen: bool = False) -> None:
        """task is 'asr' or 'tts'; corpus-level WER (errors summed over words summed)."""
        errors, words = word_errors(ref, hyp)
        self._count(task, unseen)
        self._add(f"{task}_wer", float(errors), float(words), unseen)

    def add_bits(self, modality: str, nats: float, tokens: int, unseen: bool = False) -> None:
        """Summed negative log-likelihood (nats) over `tokens` held-out tokens of one modality."""
        if tokens <= 0:
            return
        self._add(f"bpt_{modality}", nats / math.log(2), float(tokens), unseen)
        self.counts[f"tokens_{modality}"] += tokens
        if unseen:
            self.unseen_counts[f"tokens_{modality}"] += tokens

    def add_bits_document(self, unseen: bool = False) -> None:
        self._count("bits", unseen)

    @staticmethod
    def _layout(sums: dict[str, _Sum], counts: Counter) -> dict:
        out: dict = {}
        for key in METRIC_TASKS:
            s = sums.get(key)
            out[key] = None if s is None else s.mean
        out["bits_per_token"] = {m: (sums[f"bpt_{m}"].mean if f"bpt_{m}" in sums else None) for m in BPT_MODALITIES}
        out["n"] = {t: int(counts.get(t, 0)) for t in ("t2i", "a2i", "caption", "ground", "refer", "asr", "tts", "bits")}
        out["n"].update({f"tokens_{m}": int(counts.get(f"tokens_{m}", 0)) for m in BPT_MODALITIES})
        return out

    def result(self) -> dict:
        """metrics.json: a metric with no examples is null (never a made-up 0)."""
        out = self._layout(self.sums, self.counts)
        out["unseen"] = self._layout(self.unseen_sums, self.unseen_counts)
        return out


def format_table(result: dict) -> str:
    """A plain text table of the metrics, overall and unseen, with their counts."""
    rows = [("metric", "overall", "unseen", "n", "n unseen")]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for key, task in METRIC_TASKS.items():
        rows.append((key, fmt(result.get(key)), fmt(result["unseen"].get(key)),
                     str(result["n"].get(task, 0)), str(result["unseen"]["n"].get(task, 0))))
    for m in BPT_MODALITIES:
        rows.append((f"bits_per_token.{m}", fmt(result["bits_per_token"].get(m)),
                     fmt(result["unseen"]["bits_per_token"].get(m)), str(result["n"].get(f"tokens_{m}", 0)),
                     str(result["unseen"]["n"].get(f"tokens_{m}", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

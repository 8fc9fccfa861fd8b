"""The docs/world.md metrics as plain functions, and the aggregator that writes `metrics.json`.

Each check returns numbers for one example; `Metrics` sums them per task, overall and on the
unseen-combination subset, and `Metrics.result()` lays them out under the exact keys of docs/world.md.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..data.checker import normalize_words, objects_match, position_accuracy, size_accuracy
from ..modality import MODALITY_NAMES


# ---- word error rate ----------------------------------------------------------------------------
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
    """(errors, reference words) of one transcript, on the checker's normalized words.

    Corpus WER = sum of errors / sum of reference words (long utterances weigh more), the usual
    definition."""
    r, h = normalize_words(ref), normalize_words(hyp)
    return edit_distance(r, h), len(r)


# ---- images ---------------------------------------------------------------------------------------
def image_check(truth: list[dict], found: list[dict], asked: str | None = None,
                drawn: str | None = None) -> dict[str, float]:
    """The image check (docs/world.md) of one generated image against the objects its prompt asked for.

    correct: the (colour, shape) multiset equals the prompt's (`checker.objects_match`);
    position / size: share of the prompt's objects found with the right colour, shape AND position
    (size) word (`checker.position_accuracy` / `size_accuracy`);
    aspect (when the aspect `asked` is given): 1 when the image was `drawn` at that aspect
    ("square" / "wide" / "tall"), 0 when not or when no image came out (`drawn` None)."""

    out = {"correct": float(objects_match(found, truth)), "position": float(position_accuracy(found, truth)),
           "size": float(size_accuracy(found, truth))}
    if asked is not None:
        out["aspect"] = float(drawn == asked)
    return out


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
    "t2i_aspect_match": "t2i", "a2i_accuracy": "a2i", "a2i_aspect_match": "a2i", "caption_accuracy": "i2t",
    "grounding_acc50": "ground", "grounding_miou": "ground",
    "refer_accuracy": "refer", "asr_wer": "asr", "tts_wer": "tts",
}


@dataclass
class Metrics:
    """Accumulates per-example results; `result()` is the metrics.json layout of docs/world.md."""

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

    def add_image(self, task: str, check: dict[str, float], unseen: bool = False) -> None:
        """task is 't2i' or 'a2i'; check is `image_check(...)`'s result."""
        self._count(task, unseen)
        self._add(f"{task}_accuracy", float(check["correct"]), 1, unseen)
        if "aspect" in check:
            self._add(f"{task}_aspect_match", float(check["aspect"]), 1, unseen)
        if task == "t2i":
            self._add("t2i_position_accuracy", float(check["position"]), 1, unseen)
            self._add("t2i_size_accuracy", float(check["size"]), 1, unseen)

    def add_caption(self, correct: bool, unseen: bool = False) -> None:
        self._count("i2t", unseen)
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
        out["bits_per_token"] = {m: (sums[f"bpt_{m}"].mean if f"bpt_{m}" in sums else None) for m in MODALITY_NAMES}
        out["n"] = {t: int(counts.get(t, 0)) for t in ("t2i", "a2i", "i2t", "ground", "refer", "asr", "tts", "bits")}
        out["n"].update({f"tokens_{m}": int(counts.get(f"tokens_{m}", 0)) for m in MODALITY_NAMES})
        return out

    def result(self) -> dict:
        """metrics.json: a metric with no examples is null (never a made-up 0)."""
        out = self._layout(self.sums, self.counts)
        out["unseen"] = self._layout(self.unseen_sums, self.unseen_counts)
        return out


# ---- per aspect -------------------------------------------------------------------------------------
ASPECT_GROUPS = {"square": ("square",), "wide": ("wide",), "tall": ("tall",), "non_square": ("wide", "tall")}
# metric -> (task, the field of its examples that is averaged)
ASPECT_METRICS = {
    "t2i_accuracy": ("t2i", "correct"), "t2i_position_accuracy": ("t2i", "position"),
    "t2i_size_accuracy": ("t2i", "size"), "t2i_aspect_match": ("t2i", "aspect_match"),
    "a2i_accuracy": ("a2i", "correct"), "a2i_aspect_match": ("a2i", "aspect_match"),
    "caption_accuracy": ("i2t", "correct"), "grounding_acc50": ("ground", "correct"),
    "grounding_miou": ("ground", "iou"), "refer_accuracy": ("refer", "correct"),
}
ASPECT_TASKS = ("t2i", "a2i", "i2t", "ground", "refer")


def by_aspect(examples: list[dict]) -> dict[str, dict]:
    """The image-text metrics per aspect of the scene asked about or shown (`square`, `wide`, `tall`,
    and `non_square` = wide and tall together), from the eval examples (each has `task`, `aspect` and
    the fields of `ASPECT_METRICS`); null where a group had no examples of a task, counts under `n`."""
    out: dict[str, dict] = {}
    for group, aspects in ASPECT_GROUPS.items():
        mine = [e for e in examples if e.get("aspect", "square") in aspects and e["task"] in ASPECT_TASKS]
        row: dict = {}
        for key, (task, attr) in ASPECT_METRICS.items():
            vals = [float(e[attr]) for e in mine if e["task"] == task and e.get(attr) is not None]
            row[key] = sum(vals) / len(vals) if vals else None
        row["n"] = {t: sum(e["task"] == t for e in mine) for t in ASPECT_TASKS}
        out[group] = row
    return out


def format_aspect_table(aspects: dict[str, dict]) -> str:
    """The per-aspect metrics as a plain text table (empty when there was nothing but square)."""
    groups = [g for g in ("square", "wide", "tall") if g in aspects]
    if not any(sum(aspects[g]["n"].values()) for g in groups if g != "square"):
        return ""
    rows = [("by aspect", *groups, "n " + "/".join(groups))]
    for key, (task, _) in ASPECT_METRICS.items():
        if any(aspects[g].get(key) is not None for g in groups):
            v = [aspects[g].get(key) for g in groups]
            rows.append((key, *("-" if x is None else f"{x:.3f}" for x in v),
                         "/".join(str(aspects[g]["n"][task]) for g in groups)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A plain text table of the metrics, overall and unseen, with their counts (and, when the data
    held non-square scenes, the image-text metrics per aspect)."""
    rows = [("metric", "overall", "unseen", "n", "n unseen")]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for key, task in METRIC_TASKS.items():
        rows.append((key, fmt(result.get(key)), fmt(result["unseen"].get(key)),
                     str(result["n"].get(task, 0)), str(result["unseen"]["n"].get(task, 0))))
    for m in MODALITY_NAMES:
        rows.append((f"bits_per_token.{m}", fmt(result["bits_per_token"].get(m)),
                     fmt(result["unseen"]["bits_per_token"].get(m)), str(result["n"].get(f"tokens_{m}", 0)),
                     str(result["unseen"]["n"].get(f"tokens_{m}", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    aspects = format_aspect_table(result.get("by_aspect") or {})
    return "\n".join(lines) + ("\n\n" + aspects if aspects else "")

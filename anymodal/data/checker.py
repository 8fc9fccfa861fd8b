"""The demo world's checks (docs/world.md, "Measuring what the model learned").

- `parse_caption(text)`: a caption back into objects (size, colour, shape, position), or None;
  `caption_aspect(text)`: the aspect ("wide", "tall") a caption asks for, else "square".
- `analyse_image(img)`: objects found in an image by the image check: each pixel goes to the
  nearest palette colour or the background (rejected when farther than 60 in RGB), 8-connected
  components of >= 12 px per colour become objects, and a component's shape is called by its fill
  ratio = area / box area (square >= 0.90, circle 0.65-0.90, triangle 0.35-0.65). An image is
  judged at its own size: positions on a 3 x 3 grid of its width and height, sizes against its
  short side, as the world defines them (`scenes.py`); `image_aspect(img)` is its aspect word.
- comparisons used by `eval`: `objects_match` (same multiset of (colour, shape)),
  `position_accuracy`, `size_accuracy`, `caption_correct`, `parse_referring`, `normalize_words`
  (box IoU: `anymodal.tokenizers.stream.iou`; word errors: `anymodal.eval.metrics.word_errors`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .scenes import (
    ASPECT_LEAD_INS,
    BACKGROUND,
    COLOURS,
    PALETTE,
    PHRASE_LEAD_INS,
    POSITIONS,
    SHAPES,
    aspect_word,
    position_word,
    size_word,
)

REJECT_DISTANCE = 60.0
MIN_COMPONENT = 12
FILL_SQUARE, FILL_CIRCLE, FILL_TRIANGLE = 0.90, 0.65, 0.35

_COL = "|".join(COLOURS)
_SHP = "|".join(SHAPES)
_POS = "|".join(sorted(POSITIONS, key=len, reverse=True))  # longest first: "top left" before "top"
_OBJECT_RE = re.compile(rf"^an? (small|large) ({_COL}) ({_SHP}) (?:in the (center)|at the ({_POS}))$")
_PLACE_FIRST_RE = re.compile(rf"^(?:in the (center)|at the ({_POS})) an? (small|large) ({_COL}) ({_SHP})$")
_REF_RE = re.compile(rf"\bthe ({_COL}) ({_SHP})\b")
_ASPECT_LEADS = {a: tuple(lead for leads in PHRASE_LEAD_INS.values() for lead in leads[a]) for a in ASPECT_LEAD_INS}
_LEAD_INS = ("a picture of ", "there is ", "there are ", "an image of ", "a photo of ",
             *(lead for leads in PHRASE_LEAD_INS.values() for lead in leads["square"] if lead),
             *(lead for leads in _ASPECT_LEADS.values() for lead in leads))


def _object_phrase(text: str) -> dict | None:
    """One object's phrase, its place last or first -> {size, colour, shape, position}."""
    m = _OBJECT_RE.match(text)
    if m is not None:
        size, colour, shape, center, pos = m.groups()
    elif (m := _PLACE_FIRST_RE.match(text)) is not None:
        center, pos, size, colour, shape = m.groups()
    else:
        return None
    return {"size": size, "colour": colour, "shape": shape, "position": center or pos}


# ------------------------------------------------------------------------------------ captions


def parse_caption(text: str) -> list[dict] | None:
    """`"a small red circle at the top left and a large ..."` -> [{size, colour, shape, position}];
    phrases that name the place first ("at the top left a small red circle, ...") parse the same.

    Tolerates case, surrounding whitespace, a final period and the usual lead-ins; returns None
    when any part is not an object phrase of the world's grammar.
    """
    if not isinstance(text, str):
        return None
    t = " ".join(text.strip().lower().split()).rstrip(".")
    for lead in _LEAD_INS:
        if t.startswith(lead) and _object_phrase(t[len(lead):].split(", ")[0].split(" and ")[0]):
            t = t[len(lead):]
            break
    if not t:
        return None
    parts = [p for chunk in t.split(", ") for p in chunk.split(" and ")]
    objects = [_object_phrase(p.strip()) for p in parts]
    return None if None in objects else objects  # type: ignore[return-value]


def caption_aspect(text: str) -> str:
    """The aspect a caption asks for: "wide" / "tall" when it opens with one of the world's aspect
    lead-ins ("a wide picture of ..."), else "square"."""
    t = " ".join(str(text).strip().lower().split())
    for aspect, leads in _ASPECT_LEADS.items():
        if t.startswith(leads):
            return aspect
    return "square"


def parse_referring(text: str) -> tuple[str, str] | None:
    """`"<ref>the blue square</ref>"` / `"the blue square"` -> ("blue", "square"), else None."""
    if not isinstance(text, str):
        return None
    t = text.lower().replace("<ref>", " ").replace("</ref>", " ")
    found = _REF_RE.findall(t)
    return (found[0][0], found[0][1]) if len(found) == 1 else None


# -------------------------------------------------------------------------------------- images

_REF_COLOURS = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], dtype=np.float32)  # [7, 3]
_EIGHT = np.ones((3, 3), dtype=bool)


def classify_pixels(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W]: palette index 0-5, 6 = background, -1 = rejected."""
    x = np.asarray(img, dtype=np.float32)[..., :3]
    d2 = ((x[:, :, None, :] - _REF_COLOURS[None, None]) ** 2).sum(-1)  # [H, W, 7]
    cls = d2.argmin(-1)
    cls[np.take_along_axis(d2, cls[..., None], -1)[..., 0] > REJECT_DISTANCE ** 2] = -1
    return cls


def shape_from_fill(fill: float) -> str | None:
    if fill >= FILL_SQUARE:
        return "square"
    if fill >= FILL_CIRCLE:
        return "circle"
    if fill >= FILL_TRIANGLE:
        return "triangle"
    return None


def analyse_image(img: np.ndarray) -> list[dict]:
    """Objects in an image: [{colour, shape, box (x1, y1, x2, y2) px exclusive, size, position,
    area, fill}], ordered top-to-bottom then left-to-right. `shape` is None when the fill ratio
    is below every shape's range (such an object never matches a prompt)."""

    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"analyse_image wants uint8 [H, W, 3], got shape {img.shape}")
    h, w = img.shape[:2]
    cls = classify_pixels(img)
    found = []
    for ci, colour in enumerate(COLOURS):
        mask = cls == ci
        if mask.sum() < MIN_COMPONENT:
            continue
        labels, n = ndimage.label(mask, structure=_EIGHT)
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for j, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or areas[j] < MIN_COMPONENT:
                continue
            y1, y2, x1, x2 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            fill = float(areas[j]) / float((x2 - x1) * (y2 - y1))
            box = (int(x1), int(y1), int(x2), int(y2))
            found.append({"colour": colour, "shape": shape_from_fill(fill), "box": box,
                          "size": size_word(max(x2 - x1, y2 - y1), min(w, h)),
                          "position": position_word(box, w, h), "area": int(areas[j]), "fill": round(fill, 4)})
    found.sort(key=lambda o: (o["box"][1], o["box"][0]))
    return found


def image_aspect(img: np.ndarray) -> str:
    """"square", "wide" or "tall" by the image's own width and height."""
    h, w = np.asarray(img).shape[:2]
    return aspect_word(int(w), int(h))


# --------------------------------------------------------------------------------- comparisons


def object_pairs(objects: Iterable[dict]) -> Counter:
    """Multiset of (colour, shape)."""
    return Counter((o["colour"], o["shape"]) for o in objects)


def objects_match(predicted: Sequence[dict], truth: Sequence[dict]) -> bool:
    """The image check's verdict: the same (colour, shape) objects, no more, no fewer."""
    return object_pairs(predicted) == object_pairs(truth)


def match_objects(predicted: Sequence[dict], truth: Sequence[dict]) -> list[tuple[dict, dict | None]]:
    """Each truth object with the predicted object of the same (colour, shape), or None."""
    pool: dict[tuple, list[dict]] = {}
    for o in predicted:
        pool.setdefault((o["colour"], o["shape"]), []).append(o)
    out = []
    for t in truth:
        cands = pool.get((t["colour"], t["shape"]), [])
        out.append((t, cands.pop(0) if cands else None))
    return out


def _attribute_hits(predicted, truth, attr: str) -> tuple[int, int]:
    pairs = match_objects(predicted, truth)
    return sum(p is not None and p.get(attr) == t.get(attr) for t, p in pairs), len(pairs)


def position_accuracy(predicted: Sequence[dict], truth: Sequence[dict]) -> float:
    """Share of truth objects found with the right (colour, shape) AND position word."""
    hit, n = _attribute_hits(predicted, truth, "position")
    return hit / n if n else 1.0


def size_accuracy(predicted: Sequence[dict], truth: Sequence[dict]) -> float:
    """Share of truth objects found with the right (colour, shape) AND size word."""
    hit, n = _attribute_hits(predicted, truth, "size")
    return hit / n if n else 1.0


def _full(o: dict) -> tuple:
    return (o.get("size"), o["colour"], o["shape"], o.get("position"))


def caption_correct(text: str, truth: Sequence[dict]) -> bool:
    """Caption accuracy: parsed (size, colour, shape, position) objects equal the truth (any order)."""
    parsed = parse_caption(text)
    return parsed is not None and Counter(map(_full, parsed)) == Counter(map(_full, truth))


def refer_correct(text: str, colour: str, shape: str) -> bool:
    return parse_referring(text) == (colour, shape)


def normalize_words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


"""Scenes of the demo world: sampling, rendering and the texts that describe them (docs/world.md).

A scene is 1-3 solid shapes on a white `W x H` canvas (square, wide or tall). Boxes are square,
in pixels, `(x1, y1, x2, y2)` with exclusive ends (side = x2 - x1), at least 2 px apart and inside
the canvas. Every word is relative to the canvas, so it stays true on any canvas: a size is a box
side as a fraction of the canvas's short side (boxes stay square, so a circle stays round), a
position is where the box centre falls on a 3 x 3 grid of the canvas's own width and height.
Shapes are drawn without anti-aliasing by testing pixel centres, so every pixel is exactly a
palette colour or white and the checker can recover the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import ceil, floor

import numpy as np

BACKGROUND = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_RANGE = {"small": (0.18, 0.28), "large": (0.34, 0.46)}  # box side as a fraction of the short side
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
LEAD_INS = ("", "a picture of ", "there is ")
# A prompt that asks for a non-square image says so (t2i and story captions, spoken a2i captions):
# the model cannot guess the aspect from the objects. The first phrasing is the one eval's docs use.
ASPECT_LEAD_INS: dict[str, tuple[str, ...]] = {
    "wide": ("a wide picture of ", "a wide image of ", "wide: "),
    "tall": ("a tall picture of ", "a tall image of ", "tall: "),
}
# Lead-ins per phrase order (`PHRASE_ORDERS`) and aspect. Phrases that name an object's place
# first ("at the top left a large red circle") would not be English after "a picture of", so they
# have lead-ins of their own.
PHRASE_LEAD_INS: dict[str, dict[str, tuple[str, ...]]] = {
    "object_first": {"square": LEAD_INS, **ASPECT_LEAD_INS},
    "position_first": {"square": ("", "in the picture: ", "picture: "),
                       "wide": ("a wide picture: ", "a wide image: ", "wide: "),
                       "tall": ("a tall picture: ", "a tall image: ", "tall: ")},
}
ASPECTS = ("square", "wide", "tall")
MIN_GAP = 2  # free pixels between any two boxes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # pixels, exclusive ends

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def to_dict(self, width: int, height: int | None = None) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "box": list(self.box), "position": position_word(self.box, width, height)}


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    @property
    def canvas(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def aspect(self) -> str:
        return aspect_word(self.width, self.height)

    def with_objects(self, objects) -> Scene:
        return Scene(self.width, self.height, tuple(objects))

    def to_dicts(self) -> list[dict]:
        return [o.to_dict(self.width, self.height) for o in self.objects]

    def combos(self) -> set[tuple[str, str]]:
        return {o.combo for o in self.objects}


def canvas_size(canvas: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a canvas given as a side (square) or as (width, height)."""
    return (canvas, canvas) if isinstance(canvas, int) else (int(canvas[0]), int(canvas[1]))


def aspect_word(width: int, height: int) -> str:
    """'square', 'wide' (wider than tall) or 'tall' (taller than wide)."""
    return "square" if width == height else "wide" if width > height else "tall"


def side_range(size_word: str, short: int) -> tuple[int, int]:
    """Integer box sides allowed for a size word on a canvas whose short side is `short` pixels."""
    lo, hi = SIZE_RANGE[size_word]
    return ceil(lo * short - 1e-9), floor(hi * short + 1e-9)


def size_word(side: float, short: float) -> str:
    """Size word of a box side on a canvas of short side `short`, splitting halfway between the
    small and large ranges."""
    return "small" if side / short <= (SIZE_RANGE["small"][1] + SIZE_RANGE["large"][0]) / 2 else "large"


def position_word(box, width: int, height: int | None = None) -> str:
    """Where the box centre falls on a 3x3 grid of the canvas."""
    height = width if height is None else height
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(2, max(0, int(cx * 3 // width)))
    row = min(2, max(0, int(cy * 3 // height)))
    return POSITIONS[row * 3 + col]


def boxes_apart(a, b, gap: int = MIN_GAP) -> bool:
    return b[0] - a[2] >= gap or a[0] - b[2] >= gap or b[1] - a[3] >= gap or a[1] - b[3] >= gap


def pick_side(rng: np.random.Generator, size_word: str, short: int, step: int = 1) -> int:
    """A random box side for a size word; with `step` > 1 a multiple of `step` (the one nearest
    the range's middle when none falls inside it)."""
    lo, hi = side_range(size_word, short)
    step = max(1, step)
    first = -(-lo // step) * step  # the smallest multiple of step >= lo
    if first > hi:
        return max(step, int(round((lo + hi) / 2 / step)) * step)
    # with step 1 this is exactly rng.integers(lo, hi + 1): unsnapped worlds keep their documents
    return first + step * int(rng.integers(0, (hi - first) // step + 1))


def place_box(rng: np.random.Generator, side: int, canvas: int | tuple[int, int], others, tries: int = 60,
              snap: int = 1):
    """A random square box of `side` inside the canvas, apart from `others`, its corner on a
    multiple of `snap` pixels; None if none found."""
    width, height = canvas_size(canvas)
    for _ in range(tries):
        x = snap * int(rng.integers(0, (width - side) // snap + 1))  # snap 1: any pixel, as always
        y = snap * int(rng.integers(0, (height - side) // snap + 1))
        box = (x, y, x + side, y + side)
        if all(boxes_apart(box, o) for o in others):
            return box
    return None


def sample_scene(rng: np.random.Generator, canvas: int | tuple[int, int] = 64, n_objects: int | None = None,
                 allowed: set[tuple[str, str]] | None = None,
                 must_include: tuple[str, str] | None = None, max_objects: int = 3, snap: int = 1,
                 side_step: int = 1) -> Scene:
    """Sample 1-3 non-overlapping objects with distinct (colour, shape) pairs on a canvas of
    `canvas` pixels a side, or `(width, height)`.

    `allowed` restricts the (colour, shape) pairs (train excludes the unseen ones);
    `must_include` forces one object of that pair (val's unseen-combination documents);
    `snap` > 1 puts box corners on multiples of `snap` pixels, `side_step` > 1 box sides on
    multiples of `side_step`.
    """
    width, height = canvas_size(canvas)
    allowed_list = sorted(allowed if allowed is not None else {(c, s) for c in COLOURS for s in SHAPES})
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else n_objects
    objects: list[SceneObject] = []
    wanted = [must_include] if must_include else []
    for i in range(n):
        used = {o.combo for o in objects}
        if i < len(wanted):
            combo = wanted[i]
        else:
            choices = [c for c in allowed_list if c not in used]
            if not choices:
                break
            combo = choices[int(rng.integers(len(choices)))]
        sz = SIZES[int(rng.integers(2))]
        box = None
        for word in (sz, "small"):  # a large object that does not fit is tried small
            side = pick_side(rng, word, min(width, height), side_step)
            box = place_box(rng, side, (width, height), [o.box for o in objects], snap=snap)
            if box is not None:
                sz = word
                break
        if box is None:
            if i == 0:
                raise RuntimeError(f"canvas {width}x{height} too small for one object")
            break
        objects.append(SceneObject(combo[1], combo[0], sz, box))
    order = rng.permutation(len(objects))  # the forced object is not always first
    return Scene(width, height, tuple(objects[j] for j in order))


# ------------------------------------------------------------------------------------ rendering


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Bool [side, side] mask of a shape filling a box of `side` pixels (pixel-centre test)."""
    c = np.arange(side) + 0.5  # pixel centres
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        r = side / 2
        return (c[None, :] - r) ** 2 + (c[:, None] - r) ** 2 <= r * r
    if shape == "triangle":
        # row j spans half-width (j + 0.5) / 2 around the centre (at least 0.5, so the apex row
        # has 1-2 px and the box stays tight); the base row is full. Fill ratio ~0.5-0.55.
        half = np.maximum(0.5, (np.arange(side)[:, None] + 0.5) / 2)
        return np.abs(c[None, :] - side / 2) <= half
    raise ValueError(f"unknown shape {shape!r}")


_MASKS: dict[tuple[str, int], np.ndarray] = {}


def render_scene(scene: Scene) -> np.ndarray:
    """Scene -> uint8 [H, W, 3] image."""
    img = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        key = (o.shape, x2 - x1)
        if key not in _MASKS:
            _MASKS[key] = shape_mask(*key)
        img[y1:y2, x1:x2][_MASKS[key]] = PALETTE[o.colour]
    return img


# ---------------------------------------------------------------------------------------- texts


def where_phrase(box, width: int, height: int | None = None) -> str:
    """`in the center` or `at the {position}`."""
    pos = position_word(box, width, height)
    return "in the center" if pos == "center" else f"at the {pos}"


# object_first: "a large red circle at the top left"; position_first: "at the top left a large red
# circle", the place before the object. Position first, each object's words follow the place they
# belong to, and a model that writes a caption picks a place, then reads the object there; with the
# object first it must find where an object it has named is, which it learns far more slowly
# (docs/results.md, "Captions that name the place first").
PHRASE_ORDERS = tuple(PHRASE_LEAD_INS)


# What a prompt may leave unsaid (WorldConfig.t2i_omit): the picture still shows it.
OMITTABLE = ("colour", "size", "shape", "position")


def describe(o: SceneObject, width: int, height: int | None = None, phrase_order: str = "object_first",
             omit: frozenset[str] = frozenset()) -> str:
    """One object's phrase; the words in `omit` (of OMITTABLE) left out ("shape" says "shape")."""
    words = " ".join(["a"] + [w for k, w in (("size", o.size), ("colour", o.colour)) if k not in omit]
                     + ["shape" if "shape" in omit else o.shape])
    if "position" in omit:
        return words
    where = where_phrase(o.box, width, height)
    return f"{where} {words}" if phrase_order == "position_first" else f"{words} {where}"


def join_phrases(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


CAPTION_ORDERS = ("scene", "reading")


def reading_order(scene: Scene) -> list[SceneObject]:
    """The objects as a reader (and a raster-order image decoder) meets them: by the row of the
    3 x 3 position grid their centre falls in, then left to right (then by centre, within a cell)."""

    def key(o: SceneObject) -> tuple:
        pos = POSITIONS.index(position_word(o.box, scene.width, scene.height))
        cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
        return (pos // 3, pos % 3, cy, cx)

    return sorted(scene.objects, key=key)


def caption(scene: Scene, lead_in: str = "", order: str = "scene", phrase_order: str = "object_first",
            omit: frozenset[str] = frozenset()) -> str:
    """`a small red circle at the top left, a large ... and a ...`: the objects in scene order (a
    random permutation), or in reading order (`reading_order`); each phrase in `phrase_order`,
    without the words in `omit`."""
    objects = reading_order(scene) if order == "reading" else scene.objects
    return lead_in + join_phrases([describe(o, scene.width, scene.height, phrase_order, omit) for o in objects])


def caption_lead_ins(phrase_order: str = "object_first") -> tuple[str, ...]:
    """Lead-ins of a caption that describes an image (no word about its aspect)."""
    return PHRASE_LEAD_INS[phrase_order]["square"]


def prompt_lead_ins(aspect: str, phrase_order: str = "object_first") -> tuple[str, ...]:
    """Lead-ins of a caption that asks for an image: a non-square one says its aspect, a square
    one needs no word (and keeps the plain lead-ins)."""
    return PHRASE_LEAD_INS[phrase_order][aspect]


def referring_expression(o: SceneObject) -> str:
    return f"the {o.colour} {o.shape}"


# ---------------------------------------------------------------------------------------- stories

MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def move_object(rng: np.random.Generator, scene: Scene, index: int, direction: str,
                snap: int = 1) -> Scene | None:
    """The scene with object `index` moved clearly in `direction` (by a multiple of `snap`
    pixels); None if it cannot move there."""
    o = scene.objects[index]
    dx, dy = MOVES[direction]
    side = o.box[2] - o.box[0]
    others = [p.box for j, p in enumerate(scene.objects) if j != index]
    lo = max(4, min(scene.canvas) // 8)  # a visible step
    steps = [s for s in range(lo, scene.width if dx else scene.height) if s % max(1, snap) == 0]
    if not steps:  # a grid coarser than the canvas allows no visible move
        return None
    for _ in range(20):
        step = steps[int(rng.integers(len(steps)))]
        x, y = o.box[0] + dx * step, o.box[1] + dy * step
        box = (x, y, x + side, y + side)
        if min(box) < 0 or box[2] > scene.width or box[3] > scene.height:
            continue
        if all(boxes_apart(box, b) for b in others):
            objs = list(scene.objects)
            objs[index] = replace(o, box=box)
            return scene.with_objects(objs)
    return None

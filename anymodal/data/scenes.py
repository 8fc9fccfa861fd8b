"""Scenes of the demo world: sampling, rendering and the texts that describe them (docs/world.md).

A scene is 1-3 solid shapes on a white `S x S` canvas. Boxes are square, in pixels,
`(x1, y1, x2, y2)` with exclusive ends (side = x2 - x1), at least 2 px apart and inside the canvas.
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
SIZE_RANGE = {"small": (0.18, 0.28), "large": (0.34, 0.46)}  # box side as a fraction of S
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
LEAD_INS = ("", "a picture of ", "there is ")
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

    def to_dict(self, canvas: int) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "box": list(self.box), "position": position_word(self.box, canvas)}


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def to_dicts(self) -> list[dict]:
        return [o.to_dict(self.size) for o in self.objects]

    def combos(self) -> set[tuple[str, str]]:
        return {o.combo for o in self.objects}


def side_range(size_word: str, canvas: int) -> tuple[int, int]:
    """Integer box sides allowed for a size word on an `canvas x canvas` image."""
    lo, hi = SIZE_RANGE[size_word]
    return ceil(lo * canvas - 1e-9), floor(hi * canvas + 1e-9)


def size_word(side: float, canvas: int) -> str:
    """Size word of a box side, splitting halfway between the small and large ranges."""
    return "small" if side / canvas <= (SIZE_RANGE["small"][1] + SIZE_RANGE["large"][0]) / 2 else "large"


def position_word(box, width: int, height: int | None = None) -> str:
    """Where the box centre falls on a 3x3 grid of the canvas."""
    height = width if height is None else height
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(2, max(0, int(cx * 3 // width)))
    row = min(2, max(0, int(cy * 3 // height)))
    return POSITIONS[row * 3 + col]


def boxes_apart(a, b, gap: int = MIN_GAP) -> bool:
    return b[0] - a[2] >= gap or a[0] - b[2] >= gap or b[1] - a[3] >= gap or a[1] - b[3] >= gap


def place_box(rng: np.random.Generator, side: int, canvas: int, others, tries: int = 60):
    """A random square box of `side` inside the canvas, apart from `others`; None if none found."""
    for _ in range(tries):
        x, y = int(rng.integers(0, canvas - side + 1)), int(rng.integers(0, canvas - side + 1))
        box = (x, y, x + side, y + side)
        if all(boxes_apart(box, o) for o in others):
            return box
    return None


def sample_scene(rng: np.random.Generator, canvas: int = 64, n_objects: int | None = None,
                 allowed: set[tuple[str, str]] | None = None,
                 must_include: tuple[str, str] | None = None, max_objects: int = 3) -> Scene:
    """Sample 1-3 non-overlapping objects with distinct (colour, shape) pairs.

    `allowed` restricts the (colour, shape) pairs (train excludes the unseen ones);
    `must_include` forces one object of that pair (val's unseen-combination documents).
    """
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
            lo, hi = side_range(word, canvas)
            box = place_box(rng, int(rng.integers(lo, hi + 1)), canvas, [o.box for o in objects])
            if box is not None:
                sz = word
                break
        if box is None:
            if i == 0:
                raise RuntimeError(f"canvas {canvas} too small for one object")
            break
        objects.append(SceneObject(combo[1], combo[0], sz, box))
    order = rng.permutation(len(objects))  # the forced object is not always first
    return Scene(canvas, tuple(objects[j] for j in order))


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
    """Scene -> uint8 [S, S, 3] image."""
    img = np.empty((scene.size, scene.size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        key = (o.shape, x2 - x1)
        if key not in _MASKS:
            _MASKS[key] = shape_mask(*key)
        img[y1:y2, x1:x2][_MASKS[key]] = PALETTE[o.colour]
    return img


# ---------------------------------------------------------------------------------------- texts


def describe(o: SceneObject, canvas: int) -> str:
    pos = position_word(o.box, canvas)
    where = "in the center" if pos == "center" else f"at the {pos}"
    return f"a {o.size} {o.colour} {o.shape} {where}"


def join_phrases(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, lead_in: str = "") -> str:
    """`a small red circle at the top left, a large ... and a ...` (objects in scene order)."""
    return lead_in + join_phrases([describe(o, scene.size) for o in scene.objects])


def referring_expression(o: SceneObject) -> str:
    return f"the {o.colour} {o.shape}"


# ---------------------------------------------------------------------------------------- stories

MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def move_object(rng: np.random.Generator, scene: Scene, index: int, direction: str) -> Scene | None:
    """The scene with object `index` moved clearly in `direction`; None if it cannot move there."""
    o = scene.objects[index]
    dx, dy = MOVES[direction]
    side = o.box[2] - o.box[0]
    others = [p.box for j, p in enumerate(scene.objects) if j != index]
    lo = max(4, scene.size // 8)  # a visible step
    steps = list(range(lo, scene.size))
    for _ in range(20):
        step = steps[int(rng.integers(len(steps)))]
        x, y = o.box[0] + dx * step, o.box[1] + dy * step
        box = (x, y, x + side, y + side)
        if min(box) < 0 or box[2] > scene.size or box[3] > scene.size:
            continue
        if all(boxes_apart(box, b) for b in others):
            objs = list(scene.objects)
            objs[index] = replace(o, box=box)
            return Scene(scene.size, tuple(objs))
    return None

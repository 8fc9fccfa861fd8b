"""Grounding: the box of a phrase in an image, in pixels of the input image.

The prompt is laid out like the world's `ground` documents, the query before the image,
`<s> find <ref>the red circle</ref> <image>` (the grounding cue of docs/world.md; `<image>` is the
stream's image span, `<boi> <size_h> <size_w> rows <eoi>` or, version 1, `<boi> c_1 … c_{h·w} <eoi>`),
and generation is forced to start with
`<box>`; the grammar then allows exactly four `<loc_*>` (x1 < x2, y1 < y2) and `</box>`. Locations
are decoded greedily by default.

score: the mean probability the model gave the four chosen `<loc_*>` tokens (each under the
grammar-constrained distribution at temperature 1), in (0, 1]. A model sure of its box scores near 1.

The box is predicted in the coordinates of the tokenized image and mapped back to the input image's
pixels by undoing the fit of the image tokenizer's `image_mode`: a resized or letterboxed square, or
(native) the input's own aspect on the grid of at most `max_tokens` codes nearest it, where each axis
is scaled on its own, so normalized coordinates are the input's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from ..data.cues import ground_query
from ..data.media import fit_image, open_image
from ..errors import UserError
from ..fileio import atomic_path
from ..tokenizers.stream import Image, Stream, bins_to_box
from .engine import Engine, Request
from .prompt import image_codes, image_mode
from .sampling import ModalitySampling, SamplingParams


@dataclass
class Grounding:
    box: tuple[float, float, float, float]  # normalized to the model's image
    score: float


def ground_prompt(space, text_tok, codes: np.ndarray, query: str) -> list[int]:
    """`<s> find <ref>query</ref> <image>` as ids (the `ground` document layout); codes [h, w]."""
    image = Stream(space, text_tok).segment_ids(Image(np.asarray(codes, dtype=np.int64)))
    # The query goes through the tokenizer inside its cue and <ref> markers, exactly as training text did.
    return [space.bos, *text_tok.encode(ground_query(query)), *image]


def greedy_loc() -> ModalitySampling:
    s = ModalitySampling.default()
    s.loc = SamplingParams(0.0, 0, 1.0)
    return s


def ground_codes(bundle, items: list[tuple[np.ndarray, str]], engine: Engine | None = None,
                 sampling: ModalitySampling | None = None, seed: int = 0) -> list[Grounding]:
    """Batched grounding of (image code grid, query) pairs."""
    sp = bundle.space
    engine = engine or Engine(bundle.model, sp, device=bundle.device, max_image_tokens=bundle.max_image_tokens)
    reqs = [Request(ground_prompt(sp, bundle.tok.text, c, q), max_new_tokens=6, sampling=sampling or greedy_loc(),
                    seed=seed + i, force=[sp.box], stop_after_span=True) for i, (c, q) in enumerate(items)]
    for r in reqs:
        if len(r.prompt) + 6 > engine.max_len:
            raise UserError(f"the grounding prompt is {len(r.prompt)} tokens; with the 6-token box it does not "
                            f"fit the model's context of {engine.max_len}")
    out = []
    for res in engine.generate(reqs):
        locs = [t - sp.loc_offset for t in res.tokens[1:5]]
        probs = res.probs[1:5]
        if len(locs) != 4:  # cannot happen with the grammar; kept as a clear error
            raise RuntimeError(f"grounding produced {res.tokens}")
        out.append(Grounding(bins_to_box(locs, sp.loc_bins).as_tuple(), float(np.mean(probs))))
    return out


def unfit_box(box, width: int, height: int, size: int, mode: str) -> tuple[float, float, float, float]:
    """A box normalized to the model's image -> pixels of the original width x height image.

    Undoes `anymodal.data.media.fit_image`: 'resize' and 'native' scale each axis on their own (the
    normalized box is the input's), 'letterbox' scales to fit and centres on the `size` canvas
    (a source point u lands at u·sx + ox, normalized)."""
    x1, y1, x2, y2 = box
    if mode == "letterbox" and (width != size or height != size):
        # The placement fit_image computes for an image of this size (a blank stand-in suffices).
        _, fit = fit_image(PILImage.new("RGB", (width, height)), size, "letterbox")
        x1, x2 = ((v - fit.ox) / fit.sx for v in (x1, x2))
        y1, y2 = ((v - fit.oy) / fit.sy for v in (y1, y2))
    x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    clamp = lambda v, hi: float(min(max(v, 0.0), hi))  # noqa: E731
    return (clamp(x1, width), clamp(y1, height), clamp(x2, width), clamp(y2, height))


def _open(path: str | Path):
    """The RGB PIL image as the loader sees it (EXIF orientation applied); UserError for a bad file."""
    if not Path(path).is_file():
        raise UserError(f"image file not found: {path}")
    try:
        return open_image(str(path))
    except Exception as e:  # BadRecord: not an image
        raise UserError(f"cannot read image {path}: {e}") from None


def original_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image as the loader sees it (EXIF orientation applied)."""
    return _open(path).size


def model_image(bundle, img) -> np.ndarray:
    """An RGB PIL image fitted as the image tokenizer's `image_mode` fits its training images:
    uint8 [H, W, 3] (native: the input's aspect on at most `max_tokens` codes)."""
    return bundle.tok.image.fit(img)[0]


def draw_box(path_in: str | Path, box_px, path_out: str | Path, label: str = "") -> None:
    """The image with the box (and its label) drawn in magenta, written atomically in the format of
    `path_out`'s suffix (PNG without one)."""
    out = Path(path_out)
    fmt = PILImage.registered_extensions().get(out.suffix.lower()) if out.suffix else "PNG"
    if fmt is None:
        raise ValueError(f"unknown file extension: {out.suffix}")
    im = open_image(str(path_in))
    d = ImageDraw.Draw(im)
    w = max(1, round(max(im.size) / 100))
    d.rectangle([round(v) for v in box_px], outline=(255, 0, 255), width=w)
    if label:
        d.text((box_px[0] + w + 1, box_px[1] + w), label, fill=(255, 0, 255))
    with atomic_path(out) as tmp:
        im.save(tmp, format=fmt)


def ground_image(bundle, image_path: str | Path, query: str, out: str | Path | None = None) -> dict:
    """Box of `query` in the image file, in its pixels: {"box": [x1, y1, x2, y2], "score": s}."""
    if bundle.tok.image is None:
        raise UserError("this model has no image tokenizer; it cannot ground phrases in images")
    if not query.strip():
        raise UserError("--query is empty")
    img = _open(image_path)
    width, height = img.size
    codes = image_codes(model_image(bundle, img), bundle.tok.image)[0]
    g = ground_codes(bundle, [(codes, query)])[0]
    box = unfit_box(g.box, width, height, bundle.tok.image.resolution, image_mode(bundle.tok.image))
    result = {"box": [round(v, 1) for v in box], "score": round(g.score, 4)}
    if out is not None:
        draw_box(image_path, box, out, label=query)
    return result


def format_result(result: dict) -> str:
    return json.dumps(result)

"""The stream: documents as segments <-> one sequence of token ids.

    <s> text… <boi> <size_h> <size_w> c_1,1 … c_1,w <eor> … c_h,1 … c_h,w <eor> <eoi> text…
        <boa> f_1(l_0…l_{n_q-1}) … f_T <eoa> … </s>

An image states its grid (h rows, w codes a row, as two size tokens) before its codes and ends
every row with `<eor>`, so images of any aspect share the stream and a model learns where each row
ends (the layout of Emu3 and Lumina-mGPT). Token spaces of version 1 keep the square format:
`<boi> c_1 … c_{h·w} <eoi>` with the one grid of the space. Codes are raster order;
audio is frame-major (each frame emits its n_q level codes in order);
a box is `<box><loc_x1><loc_y1><loc_x2><loc_y2></box>` with coordinates normalized to the image
and quantized to B bins. `decode` accepts any id sequence a model might emit: what it cannot
parse is reported in `Decoded.problems`, never raised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserError
from .token_space import TokenSpace


# ---- segments --------------------------------------------------------------------------------
@dataclass
class Text:
    text: str


@dataclass
class Image:
    codes: np.ndarray  # int64 [h, w], raster order

    def __eq__(self, other):
        return isinstance(other, Image) and np.array_equal(self.codes, other.codes)


@dataclass
class Audio:
    codes: np.ndarray  # int64 [T, n_q], frame-major

    def __eq__(self, other):
        return isinstance(other, Audio) and np.array_equal(self.codes, other.codes)


@dataclass
class Box:
    """A box normalized to its image: 0 <= x1 <= x2 <= 1, 0 <= y1 <= y2 <= 1."""

    x1: float
    y1: float
    x2: float
    y2: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


Segment = Text | Image | Audio | Box


@dataclass
class Decoded:
    segments: list[Segment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ended: bool = False  # saw </s>


# ---- boxes -----------------------------------------------------------------------------------
def quantize(v: float, bins: int) -> int:
    """bin = min(B-1, floor(v·B)), clamped below at 0."""
    return min(bins - 1, max(0, math.floor(v * bins)))


def dequantize(b: int, bins: int) -> float:
    """The centre of bin b."""
    return (b + 0.5) / bins


def box_to_bins(box: Sequence[float], bins: int) -> tuple[int, int, int, int]:
    return tuple(quantize(v, bins) for v in box)  # type: ignore[return-value]


def bins_to_box(b: Sequence[int], bins: int) -> Box:
    return Box(*(dequantize(int(v), bins) for v in b))


def pixels_to_box(box: Sequence[float], width: int, height: int) -> Box:
    x1, y1, x2, y2 = box
    return Box(x1 / width, y1 / height, x2 / width, y2 / height)


def box_to_pixels(box: Box | Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box.as_tuple() if isinstance(box, Box) else box
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def iou(a: Box | Sequence[float], b: Box | Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in the same units (a `Box` or four
    numbers), by `torchvision.ops.box_iou`; the one IoU of anymodal (eval, task metrics, tests).

    A box without area (x2 <= x1 or y2 <= y1: inverted, a line, a point, or NaN coordinates) covers
    nothing, so its IoU with any box, itself included, is 0.0 (torchvision alone gives NaN for two
    empty boxes and -0.0 for some inverted ones)."""

    # imported here: torchvision imports torch._dynamo, 1.3 s that every importer of this module paid
    # (`import anymodal.data.prepare`: 3.1 s with it at the top, 1.6 s without)
    from torchvision.ops import box_iou

    boxes = torch.tensor([_corners(a), _corners(b)], dtype=torch.float64)  # [2, 4]
    if not bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()):
        return 0.0
    return float(box_iou(boxes[:1], boxes[1:])[0, 0])


def _corners(box: Box | Sequence[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box.as_tuple() if isinstance(box, Box) else box
    return (float(x1), float(y1), float(x2), float(y2))


# ---- the stream ------------------------------------------------------------------------------
class Stream:
    """Serialize segments to ids (with a modality id per token) and parse ids back."""

    def __init__(self, space: TokenSpace, text_tokenizer):
        self.space = space
        self.text = text_tokenizer

    # encode ------------------------------------------------------------------------------------
    def segment_ids(self, seg: Segment) -> list[int]:
        s = self.space
        if isinstance(seg, Text):
            return self.text.encode(seg.text)
        if isinstance(seg, Image):
            codes = np.asarray(seg.codes)
            if not s.any_aspect:
                if tuple(codes.shape) != tuple(s.image_grid):
                    raise UserError(f"image codes have shape {tuple(codes.shape)}, the grid is {tuple(s.image_grid)}")
                self._check_range(codes, s.image_codebook_size, "image")
                return [s.boi, *(codes.reshape(-1).astype(np.int64) + s.image_offset).tolist(), s.eoi]
            if codes.ndim != 2 or not (1 <= min(codes.shape) and max(codes.shape) <= s.image_max_side):
                raise UserError(f"image codes have shape {tuple(codes.shape)}; the grid must be h x w with sides "
                                f"1..{s.image_max_side}")
            self._check_range(codes, s.image_codebook_size, "image")
            h, w = codes.shape
            rows = np.concatenate([codes.astype(np.int64) + s.image_offset, np.full((h, 1), s.eor)], axis=1)  # [h, w+1]
            return [s.boi, s.size_id(h), s.size_id(w), *rows.reshape(-1).tolist(), s.eoi]
        if isinstance(seg, Audio):
            codes = np.asarray(seg.codes)
            if codes.ndim != 2 or codes.shape[1] != s.audio_n_q:
                raise UserError(f"audio codes have shape {tuple(codes.shape)}, expected [T, {s.audio_n_q}]")
            self._check_range(codes, s.audio_codebook_size, "audio")
            level_base = np.arange(s.audio_n_q, dtype=np.int64) * s.audio_codebook_size  # [n_q]
            flat = (codes.astype(np.int64) + level_base + s.audio_offset).reshape(-1)  # frame-major
            return [s.boa, *flat.tolist(), s.eoa]
        if isinstance(seg, Box):
            x1, y1, x2, y2 = seg.as_tuple()
            if not (0.0 <= x1 <= x2 <= 1.0 and 0.0 <= y1 <= y2 <= 1.0):
                raise UserError(f"box {seg.as_tuple()} is not inside [0, 1] with x1<=x2, y1<=y2")
            return [s.box, *(s.loc_id(b) for b in box_to_bins(seg.as_tuple(), s.loc_bins)), s.ebox]
        raise TypeError(f"not a segment: {seg!r}")

    @staticmethod
    def _check_range(codes: np.ndarray, size: int, what: str) -> None:
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise UserError(f"{what} code out of range [0, {size}): {int(codes.min())}..{int(codes.max())}")

    def encode(self, segments: Sequence[Segment], bos: bool = True, eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids int64 [N], modality uint8 [N])."""
        ids: list[int] = [self.space.bos] if bos else []
        for seg in segments:
            ids.extend(self.segment_ids(seg))
        if eos:
            ids.append(self.space.eos)
        arr = np.asarray(ids, dtype=np.int64)
        return arr, self.space.modality_of(arr)

    # decode ------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> Decoded:
        """Recover segments from any id sequence; malformed spans are reported, not raised."""
        s = self.space
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        out = Decoded()
        text_buf: list[int] = []
        img_lo, img_hi = s.image_range()
        aud_lo, aud_hi = s.audio_range()
        loc_lo, loc_hi = s.loc_range()
        size_lo, size_hi = s.size_range() if s.any_aspect else (0, 0)

        def flush_text():
            if text_buf:
                out.segments.append(Text(self.text.decode(text_buf)))
                text_buf.clear()

        i, n = 0, len(ids)
        while i < n:
            t = ids[i]
            if not 0 <= t < s.used_size:
                out.problems.append(f"id {t} at {i} is outside the vocabulary")
                i += 1
            elif t == s.bos and i == 0 or t == s.pad:
                i += 1
            elif t == s.eos:
                out.ended = True
                if i + 1 < n:
                    out.problems.append(f"{n - i - 1} tokens after </s> ignored")
                break
            elif t == s.boi:
                flush_text()
                i = self._decode_image(ids, i, out)
            elif t == s.boa:
                flush_text()
                i = self._decode_audio(ids, i, out)
            elif t == s.box:
                flush_text()
                i = self._decode_box(ids, i, out)
            elif img_lo <= t < img_hi or aud_lo <= t < aud_hi:
                out.problems.append(f"stray {'image' if t < img_hi else 'audio'} code at {i} outside its span")
                i += 1
            elif s.any_aspect and (t == s.eor or size_lo <= t < size_hi):
                out.problems.append(f"stray image {'row end' if t == s.eor else 'size'} token at {i} outside an image")
                i += 1
            elif t in (s.eoi, s.eoa, s.ebox) or (loc_lo <= t < loc_hi):
                out.problems.append(f"stray {self.text.piece(t)} at {i}")
                i += 1
            else:
                text_buf.append(t)
                i += 1
        flush_text()
        return out

    def _decode_image(self, ids: list[int], i: int, out: Decoded) -> int:
        if self.space.any_aspect:
            return self._decode_grid_image(ids, i, out)
        s = self.space
        lo, hi = s.image_range()
        j = i + 1
        while j < len(ids) and lo <= ids[j] < hi:
            j += 1
        codes = ids[i + 1 : j]
        closed = j < len(ids) and ids[j] == s.eoi
        if len(codes) == s.image_tokens:
            out.segments.append(Image(np.asarray(codes, dtype=np.int64).reshape(s.image_grid) - lo))
            if not closed:
                out.problems.append(f"image at {i} not closed by <eoi>")
        else:
            out.problems.append(f"image at {i} has {len(codes)} codes, expected {s.image_tokens}; dropped")
        return j + 1 if closed else j

    def _decode_grid_image(self, ids: list[int], i: int, out: Decoded) -> int:
        """Version 2: `<boi> <size_h> <size_w> (codes <eor>)*h <eoi>`. Whatever is missing or ragged is
        recovered where it can be and reported: the grid comes from the size tokens, else from the
        rows seen; a short row is padded and a long one cut; rows a truncated image never reached
        are filled. Padding repeats the code above (the last row's code in that column), or the
        image's most frequent code where there is no row above."""
        s = self.space
        lo, hi = s.image_range()
        size_lo, size_hi = s.size_range()
        j = i + 1
        sizes = []
        while j < len(ids) and len(sizes) < 2 and size_lo <= ids[j] < size_hi:
            sizes.append(ids[j] - size_lo + 1)
            j += 1
        rows: list[list[int]] = [[]]
        while j < len(ids) and (lo <= ids[j] < hi or ids[j] == s.eor):
            if ids[j] == s.eor:
                rows.append([])
            else:
                rows[-1].append(ids[j] - lo)
            j += 1
        closed = j < len(ids) and ids[j] == s.eoi
        ended_rows = len(rows) - 1  # rows closed by <eor>
        if not rows[-1]:
            rows.pop()
        if not any(rows):
            out.problems.append(f"image at {i} has no codes; dropped")
            return j + 1 if closed else j
        if len(sizes) == 2:
            h, w = sizes
        else:
            h, w = len(rows), max(len(r) for r in rows)
            out.problems.append(f"image at {i} has {len(sizes)} of its 2 size tokens; grid {h}x{w} taken from its rows")
        fixes = []
        if len(rows) > h:
            fixes.append(f"{len(rows) - h} extra rows cut")
            rows = rows[:h]
        ragged = [r for r in range(len(rows)) if len(rows[r]) != w]
        if ragged:
            fixes.append(f"{len(ragged)} rows of the wrong length (first: row {ragged[0]}, {len(rows[ragged[0]])} codes)")
        if ended_rows < len(rows) or len(rows) < h:
            fixes.append(f"truncated after {ended_rows} of {h} rows")
        flat = [c for r in rows for c in r]
        common = int(np.bincount(flat).argmax())
        grid = np.full((h, w), common, dtype=np.int64)
        for r, row in enumerate(rows):
            grid[r, : min(w, len(row))] = row[:w]
            if len(row) < w and r > 0:
                grid[r, len(row):] = grid[r - 1, len(row):]
        for r in range(len(rows), h):
            if r > 0:
                grid[r] = grid[r - 1]
        out.segments.append(Image(grid))
        if fixes:
            out.problems.append(f"image at {i} ({h}x{w}): " + "; ".join(fixes) + "; filled in")
        if not closed:
            out.problems.append(f"image at {i} not closed by <eoi>")
        return j + 1 if closed else j

    def _decode_audio(self, ids: list[int], i: int, out: Decoded) -> int:
        s = self.space
        lo, hi = s.audio_range()
        k, nq = s.audio_codebook_size, s.audio_n_q
        j = i + 1
        frames: list[list[int]] = []
        frame: list[int] = []
        while j < len(ids) and lo <= ids[j] < hi:
            level, code = divmod(ids[j] - lo, k)
            if level != len(frame):
                out.problems.append(f"audio code of level {level} at {j} where level {len(frame)} was due; skipped")
            else:
                frame.append(code)
                if len(frame) == nq:
                    frames.append(frame)
                    frame = []
            j += 1
        if frame:
            out.problems.append(f"audio at {i} ends inside a frame ({len(frame)}/{nq} levels); partial frame dropped")
        closed = j < len(ids) and ids[j] == s.eoa
        if not closed:
            out.problems.append(f"audio at {i} not closed by <eoa>")
        out.segments.append(Audio(np.asarray(frames, dtype=np.int64).reshape(len(frames), nq)))
        return j + 1 if closed else j

    def _decode_box(self, ids: list[int], i: int, out: Decoded) -> int:
        s = self.space
        lo, hi = s.loc_range()
        span = ids[i + 1 : i + 6]
        if len(span) == 5 and all(lo <= t < hi for t in span[:4]) and span[4] == s.ebox:
            out.segments.append(bins_to_box([t - lo for t in span[:4]], s.loc_bins))
            return i + 6
        j = i + 1
        while j < len(ids) and lo <= ids[j] < hi:
            j += 1
        if j < len(ids) and ids[j] == s.ebox:
            j += 1
        out.problems.append(f"malformed box at {i}; dropped")
        return j

"""The token space: one vocabulary, contiguous ranges, the single source of truth for ids.

    [0, text_size)                              sentencepiece pieces (specials, <loc_i>, bytes, merges)
    [image_offset, image_offset + K_img)        image VQ codes
    [audio_offset, audio_offset + n_q * K_aud)  audio codec codes, level l code c -> audio_offset + l*K_aud + c
    eor                                         end of an image row (version 2)
    [image_size_offset, + image_max_side)       image side lengths 1..S in codes, <size_n> -> offset + n - 1 (version 2)
    [used, vocab_size)                          padding up to a multiple of 64 (never valid)

Version 1 spaces have no row or size tokens: every image is the square `image_grid`, h*w codes
between `<boi>` and `<eoi>`. Version 2 spaces (what `build` makes) write any grid:
`<boi> <size_h> <size_w> row_1 <eor> ... row_h <eor> <eoi>` (see `stream.py`). The row and size
tokens count as image tokens in the modality table; `image_range()` is the codes alone.

Masks and modality ids come from these ranges, never from piece names. The space is saved as
`token_space.json` beside every tokenizer set, token shard dir, run dir and bundle; loaders
compare what they find with `check_same`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import write_atomic
from ..modality import Modality

VOCAB_MULTIPLE = 64
VERSION = 2  # the newest layout this code writes and reads
DEFAULT_IMAGE_MAX_SIDE = 64  # size tokens <size_1>..<size_64>: up to 1,024 px a side at 16 px a code

# Names of the special pieces (sentencepiece user-defined symbols) and the attribute each id lives in.
SPECIAL_PIECES: dict[str, str] = {
    "boi": "<boi>",
    "eoi": "<eoi>",
    "boa": "<boa>",
    "eoa": "<eoa>",
    "box": "<box>",
    "ebox": "</box>",
    "ref": "<ref>",
    "eref": "</ref>",
}


def loc_piece(i: int) -> str:
    return f"<loc_{i}>"


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass
class TokenSpace:
    text_size: int
    unk: int
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    boa: int
    eoa: int
    box: int
    ebox: int
    ref: int
    eref: int
    loc_offset: int
    loc_bins: int
    image_offset: int
    image_codebook_size: int
    image_grid: tuple[int, int]
    audio_offset: int
    audio_n_q: int
    audio_codebook_size: int
    audio_frame_rate: float
    audio_sample_rate: int
    vocab_size: int
    text_fingerprint: str = ""
    version: int = 1
    eor: int = -1  # version 2: end of an image row
    image_size_offset: int = 0  # version 2: id of <size_1>
    image_max_side: int = 0  # version 2: sides 1..image_max_side in codes (0: square images only)
    _table: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        text,  # TextTokenizer
        image_codebook_size: int = 0,
        image_grid: tuple[int, int] = (0, 0),
        audio_n_q: int = 0,
        audio_codebook_size: int = 0,
        audio_frame_rate: float = 0.0,
        audio_sample_rate: int = 0,
        version: int = VERSION,
        image_max_side: int = DEFAULT_IMAGE_MAX_SIDE,
    ) -> TokenSpace:
        """Lay the image and audio ranges after the text range, then (version 2, with an image
        tokenizer) `<eor>` and the size tokens, and pad the vocab. `version=1` builds the square
        layout of older tokenizer sets."""
        if version not in (1, 2):
            raise UserError(f"token space version {version} is not one this anymodal knows (1 or {VERSION})")
        image_offset = text.vocab_size
        audio_offset = image_offset + image_codebook_size
        used = audio_offset + audio_n_q * audio_codebook_size
        aspect = version >= 2 and image_codebook_size > 0
        if aspect and image_max_side < max(image_grid):
            raise UserError(f"image_max_side {image_max_side} is below the tokenizer's grid {tuple(image_grid)}")
        structure = dict(eor=used, image_size_offset=used + 1, image_max_side=image_max_side) if aspect else {}
        if aspect:
            used += 1 + image_max_side
        return cls(
            text_size=text.vocab_size,
            **text.special_ids(),
            loc_offset=text.loc_offset,
            loc_bins=text.loc_bins,
            image_offset=image_offset,
            image_codebook_size=image_codebook_size,
            image_grid=tuple(image_grid),  # type: ignore[arg-type]
            audio_offset=audio_offset,
            audio_n_q=audio_n_q,
            audio_codebook_size=audio_codebook_size,
            audio_frame_rate=float(audio_frame_rate),
            audio_sample_rate=int(audio_sample_rate),
            vocab_size=round_up(used),
            text_fingerprint=text.fingerprint,
            version=version,
            **structure,
        )

    # ---- ids -----------------------------------------------------------------------------------
    @property
    def used_size(self) -> int:
        """Ids below this are real tokens; the rest is padding."""
        if self.any_aspect:
            return self.image_size_offset + self.image_max_side
        return self.audio_offset + self.audio_n_q * self.audio_codebook_size

    @property
    def any_aspect(self) -> bool:
        """Images carry their own grid (size tokens and row ends); False: the square format."""
        return self.image_max_side > 0

    @property
    def image_tokens(self) -> int:
        """Codes in an image of the default grid."""
        return self.image_grid[0] * self.image_grid[1]

    def image_span(self, h: int | None = None, w: int | None = None) -> int:
        """Tokens from `<boi>` to `<eoi>` inclusive for an h x w grid (default: `image_grid`)."""
        h = self.image_grid[0] if h is None else h
        w = self.image_grid[1] if w is None else w
        if self.any_aspect:
            return 2 + 2 + h * (w + 1)  # <boi> <size_h> <size_w> rows with <eor> <eoi>
        return h * w + 2

    def image_max_span(self, max_tokens: int) -> int:
        """The longest image span (`<boi>` to `<eoi>`) of any grid of at most `max_tokens` codes."""
        if not self.any_aspect:
            return self.image_span()
        return 4 + max_tokens + min(max_tokens, self.image_max_side)  # codes, one <eor> per row (h <= sides)

    def size_id(self, n: int) -> int:
        """The token of an image side of n codes (version 2)."""
        if not self.any_aspect or not 1 <= n <= self.image_max_side:
            raise UserError(f"an image side of {n} codes is not in this token space (1..{self.image_max_side})")
        return self.image_size_offset + n - 1

    def size_range(self) -> tuple[int, int]:
        return self.image_size_offset, self.image_size_offset + self.image_max_side

    def image_id(self, code):
        return self.image_offset + code

    def audio_id(self, level, code):
        return self.audio_offset + level * self.audio_codebook_size + code

    def loc_id(self, b):
        return self.loc_offset + b

    def image_range(self) -> tuple[int, int]:
        return self.image_offset, self.image_offset + self.image_codebook_size

    def audio_range(self, level: int | None = None) -> tuple[int, int]:
        if level is None:
            return self.audio_offset, self.audio_offset + self.audio_n_q * self.audio_codebook_size
        start = self.audio_offset + level * self.audio_codebook_size
        return start, start + self.audio_codebook_size

    def loc_range(self) -> tuple[int, int]:
        return self.loc_offset, self.loc_offset + self.loc_bins

    @property
    def modality_table(self) -> np.ndarray:
        """uint8 [vocab_size]: the modality of every id (padding ids count as text)."""
        if self._table is None:
            t = np.full(self.vocab_size, Modality.TEXT, dtype=np.uint8)
            t[slice(*self.loc_range())] = Modality.LOC
            t[slice(*self.image_range())] = Modality.IMAGE
            t[slice(*self.audio_range())] = Modality.AUDIO
            if self.any_aspect:
                t[self.eor] = Modality.IMAGE
                t[slice(*self.size_range())] = Modality.IMAGE
            self._table = t
        return self._table

    def modality_of(self, ids):
        """Modality id per token, same shape as `ids` (numpy array or torch tensor)."""
        if isinstance(ids, torch.Tensor):
            return torch.from_numpy(self.modality_table).to(ids.device)[ids]
        return self.modality_table[np.asarray(ids)]

    def mask(self, modality: Modality, device=None) -> torch.Tensor:
        """BoolTensor [vocab_size], True for the ids of one modality (text excludes padding)."""
        m = torch.from_numpy(self.modality_table == modality)
        if modality == Modality.TEXT:
            m[self.used_size :] = False
        return m.to(device) if device is not None else m

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["image_grid"] = list(self.image_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TokenSpace:
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        version = d.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= VERSION:
            raise UserError(f"token space version {version!r} is newer than this anymodal reads (1..{VERSION}); "
                            "upgrade anymodal")
        missing = names - set(d) - {"text_fingerprint", "version", "eor", "image_size_offset", "image_max_side"}
        if missing:
            raise UserError(f"token space is missing fields: {', '.join(sorted(missing))}")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["image_grid"] = tuple(kwargs["image_grid"])
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "token_space.json"
        write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TokenSpace:
        path = Path(path)
        if path.is_dir():
            path = path / "token_space.json"
        if not path.is_file():
            raise UserError(f"no token space at {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{path} is not a valid token space: {e}") from None

    def differences(self, other: TokenSpace) -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b.get(k)!r}" for k in a if a[k] != b.get(k)]

    def check_same(self, other: TokenSpace, what: str = "") -> None:
        """Raise a UserError naming the fields that differ (e.g. a run dir vs the tokenizers)."""
        diff = self.differences(other)
        if diff:
            where = f" ({what})" if what else ""
            raise UserError(f"token spaces disagree{where}: " + "; ".join(diff[:4]))

"""Tokenizers (text, image, audio), the token space that joins them, and the stream format.

All modality tokenizers share one interface: `encode(media) -> ids`, `decode(ids) -> media`,
`load(dir)`, `save(dir)`. A *tokenizer set* is a folder holding `text/`, `image/`, `audio/`
(image and audio optional) and `token_space.json`; it is what `prepare` consumes and what a
model bundle carries.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .stream import Stream
from .text import TextTokenizer
from .token_space import VERSION, TokenSpace


@dataclass
class Tokenizers:
    text: TextTokenizer
    image: Any  # ImageTokenizer | None
    audio: Any  # AudioTokenizer | None
    space: TokenSpace
    stream: Stream


def build_space(text: TextTokenizer, image=None, audio=None, version: int = VERSION) -> TokenSpace:
    return TokenSpace.build(
        text,
        image_codebook_size=image.codebook_size if image is not None else 0,
        image_grid=tuple(image.grid_shape) if image is not None else (0, 0),
        audio_n_q=audio.stream_levels if audio is not None else 0,
        audio_codebook_size=audio.codebook_size if audio is not None else 0,
        audio_frame_rate=audio.frame_rate if audio is not None else 0.0,
        audio_sample_rate=audio.sample_rate if audio is not None else 0,
        version=version,
    )


def load_tokenizers(path: str | Path, device: str = "cpu") -> Tokenizers:
    """Load a tokenizer set and check its saved token space against the tokenizers themselves."""
    path = Path(path)
    if not (path / "text").is_dir():
        raise UserError(f"{path} is not a tokenizer set (no text/ folder)")
    text = TextTokenizer.load(path / "text")
    image = audio = None
    if (path / "image").is_dir():
        from .image import ImageTokenizer  # vector_quantize_pytorch takes seconds to import: only when used

        image = ImageTokenizer.load(path / "image", device=device).eval()
    if (path / "audio").is_dir():
        from .audio import AudioTokenizer  # likewise

        audio = AudioTokenizer.load(path / "audio", device=device).eval()
    if (path / "token_space.json").is_file():
        # A set saved with an older layout (version 1: square images only) keeps it.
        saved = TokenSpace.load(path)
        space = build_space(text, image, audio, version=saved.version)
        saved.check_same(space, f"{path}/token_space.json vs its tokenizers")
    else:
        space = build_space(text, image, audio)
    return Tokenizers(text, image, audio, space, Stream(space, text))


def assemble_tokenizer_set(out: str | Path, text_dir: str | Path, image_dir=None, audio_dir=None) -> Tokenizers:
    """Copy trained tokenizer dirs into one set folder and write its token_space.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (("text", text_dir), ("image", image_dir), ("audio", audio_dir)):
        if src is None:
            continue
        src = Path(src)
        if not src.is_dir():
            raise UserError(f"{name} tokenizer dir not found: {src}")
        if src.resolve() != (out / name).resolve():
            shutil.copytree(src, out / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoints", "*.tmp"))
    (out / "token_space.json").unlink(missing_ok=True)  # rebuilt from the tokenizers just copied
    toks = load_tokenizers(out)
    toks.space.save(out / "token_space.json")
    return toks


__all__ = ["Tokenizers", "TokenSpace", "Stream", "TextTokenizer", "load_tokenizers",
           "assemble_tokenizer_set", "build_space"]

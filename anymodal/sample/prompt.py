"""The way in: a prompt (text with media references) -> token ids.

A prompt is text with inline references `<image:cat.png>` / `<audio:q.wav>`; `--image`/`--audio`
flags add media before the text (the image → text layout the model is trained on). Images are fitted
to the image tokenizer's resolution with its resize/letterbox mode, audio is read by the data layer's
`read_audio_file` (mono, resampled to the codec rate), and both are tokenized with the bundle's
tokenizers. `encode_prompt` does all of it; the steps are here for grounding and eval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.media import open_image, read_audio_file
from ..errors import UserError
from ..tokenizers.stream import Audio, Image, Segment, Text

MEDIA_REF = re.compile(r"<(image|audio):([^<>\n]+?)>")


@dataclass
class PromptPart:
    kind: str  # 'text' | 'image' | 'audio'
    value: str  # the text, or a file path


@dataclass
class Prompt:
    """A prompt ready for the model, with what the output page shows of it."""

    parts: list[PromptPart]  # text and media in order (empty text left out)
    pixels: list[np.ndarray | None]  # per part: uint8 [S, S, 3] as the model saw the image, else None
    ids: list[int]  # token ids, starting with `<s>`


def encode_prompt(text: str, tok, images=(), audios=()) -> Prompt:
    """Prompt text (+ flag media) -> ids, with `tok` the bundle's tokenizers (and their stream)."""
    parts = parse_prompt(text, images, audios)
    segments, pixels = prompt_segments(parts, tok)
    ids, _ = tok.stream.encode(segments, bos=True, eos=False)
    return Prompt([p for p in parts if p.kind != "text" or p.value], pixels, [int(i) for i in ids])


def parse_prompt(text: str, images=(), audios=()) -> list[PromptPart]:
    """Split a prompt into text and media references; flag media come first."""
    parts = [PromptPart("image", p) for p in images] + [PromptPart("audio", p) for p in audios]
    pos = 0
    for m in MEDIA_REF.finditer(text):
        if m.start() > pos:
            parts.append(PromptPart("text", text[pos: m.start()]))
        parts.append(PromptPart(m.group(1), m.group(2).strip()))
        pos = m.end()
    if pos < len(text):
        parts.append(PromptPart("text", text[pos:]))
    return parts


def prompt_segments(parts: list[PromptPart], tok) -> tuple[list[Segment], list[np.ndarray | None]]:
    """Prompt parts -> stream segments (media tokenized), plus the fitted pixels of each non-empty part."""
    segments: list[Segment] = []
    pixels: list[np.ndarray | None] = []
    for p in parts:
        if p.kind == "text":
            if p.value:
                segments.append(Text(p.value))
                pixels.append(None)
        elif p.kind == "image":
            if tok.image is None:
                raise UserError("this model has no image tokenizer, so prompts cannot hold images")
            arr = read_image(p.value, tok.image)
            segments.append(Image(image_codes(arr, tok.image)[0]))
            pixels.append(arr)
        else:
            if tok.audio is None:
                raise UserError("this model has no audio tokenizer, so prompts cannot hold audio")
            wave = read_audio_file(p.value, tok.audio.sample_rate)
            segments.append(Audio(audio_codes(wave, tok.audio)))
            pixels.append(None)
    return segments, pixels


def image_mode(image_tok) -> str:
    """How the image tokenizer fits images: 'resize' or 'letterbox' (to its square) or 'native'
    (each image's own aspect within its token budget)."""
    cfg = getattr(image_tok, "cfg", None)
    return getattr(getattr(cfg, "model", None), "image_mode", "resize")


def read_image(path: str | Path, image_tok, max_tokens: int | None = None, mode: str | None = None) -> np.ndarray:
    """uint8 [H, W, 3] as the tokenizer takes the image: its square resolution (resize/letterbox) or,
    native (its mode, `mode="native"`, or a `max_tokens` budget given), the grid nearest the image's
    aspect within `max_tokens` codes (default: the tokenizer's budget). UserError for a missing/bad file."""
    if not Path(path).is_file():
        raise UserError(f"image file not found: {path}")
    if mode is None and max_tokens is not None:
        mode = "native"
    try:
        return image_tok.fit(open_image(str(path)), mode or image_mode(image_tok), max_tokens)[0]
    except UserError:
        raise
    except Exception as e:  # BadRecord and friends: a user's file that is not an image
        raise UserError(f"cannot read image {path}: {e}") from None


@torch.inference_mode()
def image_codes(pixels: np.ndarray | list[np.ndarray], image_tok, batch: int = 64) -> list[np.ndarray]:
    """uint8 [H, W, 3] (or a list, sizes may differ) -> int64 code grids [H / f, W / f], in order;
    images of one size are encoded together, `batch` at a time."""
    return image_tok.encode_pixels(pixels if isinstance(pixels, list) else [pixels], batch)


@torch.inference_mode()
def audio_codes(wave: np.ndarray, audio_tok) -> np.ndarray:
    """float32 [T] -> int64 codes [frames, stream_levels] (the levels the token stream carries)."""
    dev = next(audio_tok.parameters()).device
    return audio_tok.encode_stream(torch.from_numpy(np.asarray(wave, dtype=np.float32))[None].to(dev))[0].cpu().numpy()

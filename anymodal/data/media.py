"""Media helpers: decode any image or audio a corpus may hold into the arrays anymodal uses.

Images of any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) and any size become RGB
`np.uint8 [H, W, 3]`: stretched to `size x size` ("resize", the default), scaled to fit a
`size x size` canvas and padded with white ("letterbox"), or resized to the grid of whole codes
nearest their own aspect within a token budget ("native", `native_grid`). Transparent pixels are
composited over white, the demo world's background.

Audio has one path in and one out, used by every part of anymodal (reader, codec trainer,
`anymodal tokenizer encode|decode audio`, `anymodal sample`, the demo world's speech):
`load_audio` decodes WAV (any PCM width or float), FLAC, OGG and MP3 with `soundfile`
(libsndfile; integer samples scaled one way: int16 / 32768, ...), averages the channels and
resamples with `resample` to mono `np.float32 [T]` at the requested rate; `encode_wav` /
`save_wav` write 16-bit PCM mono WAV (x * 32768, clipped), the file atomically.

Everything that cannot be decoded raises `BadRecord(reason, detail)`, which the reader counts and
skips. `BadRecord` lives here (and is re-exported by `reader`) so media code has no reader import.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import scipy.fft
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from ..fileio import write_atomic

# Reasons a record can be bad; the reader counts skipped records by these names.
BAD_IMAGE = "bad image"
BAD_AUDIO = "bad audio"
EMPTY_AUDIO = "empty audio"
BAD_JSON = "bad json"
BAD_BOX = "box outside image"
MISSING_FILE = "missing file"
BAD_SEGMENT = "bad segment"

PCM16_SCALE = 32768.0  # int16 sample <-> float: x / 32768 reading, x * 32768 (clipped) writing

WHITE = (255, 255, 255)


class BadRecord(Exception):
    """A record (or one of its media files) that cannot be used; `reason` is a short category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _read_bytes(src: bytes | str | os.PathLike, reason: str) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    try:
        return Path(src).read_bytes()
    except OSError as e:
        raise BadRecord(MISSING_FILE if isinstance(e, FileNotFoundError) else reason, str(e)) from None


# ----------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Fit:
    """How an image of `src_size` (w, h) was placed on a `size x size` canvas.

    A point at normalized source coordinates (u, v) lands at (u * sx + ox, v * sy + oy) in
    normalized output coordinates. For "resize" sx = sy = 1 and ox = oy = 0.
    """

    src_size: tuple[int, int]
    sx: float = 1.0
    sy: float = 1.0
    ox: float = 0.0
    oy: float = 0.0

    def box(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        """Pixel box of the source image -> normalized box of the output image."""
        w, h = self.src_size
        return (x1 / w * self.sx + self.ox, y1 / h * self.sy + self.oy,
                x2 / w * self.sx + self.ox, y2 / h * self.sy + self.oy)


def _to_rgb(img) -> PIL.Image.Image:  # noqa: F821
    """Any PIL image -> RGB, scaling high bit depths and compositing transparency over white."""

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            # float images: [0, 1] if they look normalized, else 8-bit range
            scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        elif mode == "I" and np.max(a, initial=0) <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0  # 16-bit samples
        a = np.nan_to_num(a * scale, nan=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def open_image(src: bytes | str | os.PathLike):
    """Decode an image file (bytes or path) into an RGB PIL image; raises `BadRecord`."""

    data = _read_bytes(src, BAD_IMAGE)
    if not data:
        raise BadRecord(BAD_IMAGE, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the decode now so truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord(BAD_IMAGE, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if img.width < 1 or img.height < 1:
        raise BadRecord(BAD_IMAGE, "zero-size image")
    return img


IMAGE_MODES = ("resize", "letterbox", "native")


def native_grid(width: int, height: int, max_tokens: int, max_side: int = 64) -> tuple[int, int]:
    """(rows, cols) of codes for a `width x height` image: the grid of at most `max_tokens` codes
    (and `max_side` a side) whose area is nearest the budget with the image's aspect, as Emu3 sizes
    its images. The ideal grid (area `max_tokens`, the image's aspect) is rounded down, then a side
    grows by one code where that stays within the budget and brings the aspect closer."""
    if width < 1 or height < 1 or max_tokens < 1:
        raise ValueError(f"no grid for a {width}x{height} image in {max_tokens} tokens")
    aspect = width / height
    ideal_rows = math.sqrt(max_tokens / aspect)
    rows = max(1, min(max_side, math.floor(ideal_rows)))
    cols = max(1, min(max_side, math.floor(ideal_rows * aspect), max_tokens // rows))

    def error(r: int, c: int) -> float:
        return abs(math.log(c / r / aspect))

    for r, c in ((rows + 1, cols), (rows, cols + 1)):
        if r * c <= max_tokens and max(r, c) <= max_side and error(r, c) < error(rows, cols):
            rows, cols = r, c
    return rows, cols


def fit_image(img, size: int | None, mode: str = "resize", factor: int = 8,
              max_tokens: int | None = None, max_side: int = 64) -> tuple[np.ndarray, Fit]:
    """Fit an RGB PIL image for an image tokenizer of `factor` pixels a code; returns (uint8 [H, W, 3], Fit).

    resize / letterbox: a `size x size` canvas. native: `native_grid` of at most `max_tokens` codes
    (default `(size // factor) ** 2`), each side a multiple of `factor`; boxes keep their normalized
    coordinates, since the resize scales each axis on its own."""

    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {', '.join(IMAGE_MODES)}, not {mode!r}")
    w, h = img.size
    if mode == "native":
        budget = max_tokens if max_tokens is not None else (size // factor) ** 2
        rows, cols = native_grid(w, h, budget, max_side)
        if (w, h) != (cols * factor, rows * factor):
            img = img.resize((cols * factor, rows * factor), Image.BICUBIC, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8).copy(), Fit((w, h))
    if size is None or (w == size and h == size):
        return np.asarray(img, dtype=np.uint8).copy(), Fit((w, h))  # exact pixels, no resampling
    if mode == "resize":
        out = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
        return np.asarray(out, dtype=np.uint8).copy(), Fit((w, h))
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), WHITE)
    ox, oy = (size - nw) // 2, (size - nh) // 2
    canvas.paste(img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0), (ox, oy))
    fit = Fit((w, h), sx=nw / size, sy=nh / size, ox=ox / size, oy=oy / size)
    return np.asarray(canvas, dtype=np.uint8).copy(), fit


def map_by_shape(arrays: list, fn, batch: int | None = None) -> list:
    """`fn` on the arrays of one shape together (at most `batch` at a time; a batch is one tensor),
    its per-array results put back in input order: images of mixed sizes through a tokenizer."""
    out: list = [None] * len(arrays)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(tuple(np.shape(a)), []).append(i)
    for members in groups.values():
        step = batch or len(members)
        for s in range(0, len(members), step):
            part = members[s : s + step]
            for i, r in zip(part, fn([arrays[i] for i in part])):
                out[i] = r
    return out


def load_image(src: bytes | str | os.PathLike, size: int | None = 64, mode: str = "resize") -> np.ndarray:
    """Any image (bytes or path, any mode, any size) -> RGB `np.uint8 [size, size, 3]`."""
    return fit_image(open_image(src), size, mode)[0]


def encode_png(arr: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (deterministic: no timestamps or metadata)."""

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB").save(
        buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png(arr: np.ndarray, path: str | os.PathLike) -> None:
    """uint8 [H, W, 3] -> a PNG file, written atomically."""
    write_atomic(path, encode_png(arr))


# ------------------------------------------------------------------------------------------ audio


def resample(wave_: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of float32 [T] by FFT (ideal low-pass at the lower Nyquist).

    The signal is zero-padded to a length whose FFT is fast and that maps to a whole number of
    output samples, so any pair of rates costs two FFTs; then trimmed to round(T * sr_out / sr_in).
    """


    if sr_in == sr_out or len(wave_) == 0:
        return wave_.astype(np.float32, copy=False)
    g = gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    n = len(wave_)
    k = scipy.fft.next_fast_len(-(-n // down) + 8, real=True)  # +8 blocks of zeros against wrap-around
    n_in, n_out = k * down, k * up
    # float32 (complex64) is plenty for audio and 3x faster than float64
    spec = scipy.fft.rfft(wave_.astype(np.float32), n=n_in)  # [n_in // 2 + 1]
    m = n_out // 2 + 1
    if m <= len(spec):
        spec = spec[:m].copy()
        if n_out % 2 == 0:
            spec[-1] = spec[-1].real  # the new Nyquist bin must be real
    else:
        spec = np.concatenate([spec, np.zeros(m - len(spec), spec.dtype)])
    out = scipy.fft.irfft(spec, n=n_out) * np.float32(n_out / n_in)  # [n_out]
    return out[: round(n * sr_out / sr_in)].astype(np.float32)


def to_pcm16(wave_: np.ndarray) -> np.ndarray:
    """float [T] -> int16 [T]: the inverse of the readers' scaling (x * 32768, clipped to int16;
    NaN becomes 0). int16 input passes through unchanged."""
    a = np.asarray(wave_)
    if a.ndim != 1:
        raise ValueError(f"expected a mono wave [T], got shape {a.shape}")
    if a.dtype == np.int16:
        return a
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint(a * PCM16_SCALE), -32768, 32767).astype(np.int16)


def from_pcm16(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1) (x / 32768, the scaling `soundfile` applies when reading)."""
    return (np.asarray(pcm, dtype=np.int16).astype(np.float32) / np.float32(PCM16_SCALE))


def _sf_error(e: Exception) -> str:
    """A one-line reason from a soundfile/libsndfile exception (without the `<BytesIO ...>` noise)."""
    msg = getattr(e, "error_string", None) or str(e) or type(e).__name__
    return msg.splitlines()[0] if msg.splitlines() else type(e).__name__


def load_audio(src: bytes | str | os.PathLike, sample_rate: int = 16000,
               max_seconds: float | None = None) -> np.ndarray:
    """Any audio file (bytes or path) -> mono float32 [T] at `sample_rate`; raises `BadRecord`.

    WAV (8/16/24/32-bit PCM or float), FLAC, OGG (Vorbis, Opus) and MP3 are decoded by
    `soundfile` (libsndfile), which scales integer samples one way (int16 / 32768, int32 / 2**31,
    ...); channels are averaged; `max_seconds` keeps only the start (only that much is decoded).
    """

    data = _read_bytes(src, BAD_AUDIO)
    if not data:
        raise BadRecord(EMPTY_AUDIO, "empty file")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            sr = int(f.samplerate)
            if sr <= 0:
                raise BadRecord(BAD_AUDIO, f"sample rate {sr}")
            frames = -1 if max_seconds is None else max(0, int(round(max_seconds * sr)))
            a = f.read(frames, dtype="float32", always_2d=True)  # [T, C]
    except BadRecord:
        raise
    except Exception as e:  # libsndfile: unknown format, broken header, truncated stream, ...
        raise BadRecord(BAD_AUDIO, _sf_error(e)) from None
    if a.size == 0 or a.shape[0] == 0:
        raise BadRecord(EMPTY_AUDIO, "no samples")
    mono = a.mean(axis=1, dtype=np.float32) if a.shape[1] > 1 else a[:, 0]  # [T]
    if not np.isfinite(mono).all():
        raise BadRecord(BAD_AUDIO, "NaN or infinite samples")
    out = resample(mono, sr, sample_rate)
    if len(out) == 0:
        raise BadRecord(EMPTY_AUDIO, "no samples after resampling")
    return np.ascontiguousarray(out, dtype=np.float32)


def read_audio_file(path: str | os.PathLike, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """`load_audio` for a file a user named (CLI, `--audio` prompts, the codec trainer's files):
    a missing or undecodable file is a one-line `UserError` instead of a `BadRecord`."""

    p = Path(path)
    if not p.is_file():
        raise UserError(f"audio file not found: {p}")
    try:
        return load_audio(p, sample_rate, max_seconds)
    except BadRecord as e:
        raise UserError(f"cannot read audio {p}: {e}") from None


def encode_wav(wave_: np.ndarray, sample_rate: int) -> bytes:
    """float [T] in [-1, 1] (or int16) -> 16-bit PCM mono WAV bytes (deterministic, no metadata)."""

    buf = io.BytesIO()
    soundfile.write(buf, to_pcm16(wave_), int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


def save_wav(wave_: np.ndarray, sample_rate: int, path: str | os.PathLike) -> Path:
    """`encode_wav` to a file, atomically (a temporary sibling renamed over `path`)."""
    return write_atomic(path, encode_wav(wave_, sample_rate))

"""`anymodal sample` as a library call: prompt -> ids (`prompt.encode_prompt`) -> batched
generation (`engine.Engine`) -> files on disk (`render.write_outputs`).

An image of a given size is asked for as the stream states one: `--image-size WxH` or `--aspect W:H`
append `<boi> <size_h> <size_w>` to the prompt (after its own `<boi>` when it ends with one), so the
grammar keeps exactly that grid. Without them a prompt ending in `<boi>`, or an image the model
opens, gets the model's own grid (at most the image tokenizer's `max_tokens` codes).

Text of the first sample streams to the terminal while it is generated; a progress bar runs while
an image or audio clip is generated.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from ..data.media import native_grid
from ..errors import UserError
from .constraints import AUDIO, IMAGE, TEXT
from .engine import Engine, Request
from .prompt import encode_prompt
from .render import RenderedSample, write_outputs
from .sampling import DEFAULT_CFG, MODALITIES, ModalitySampling, SamplingParams


@dataclass
class SampleOptions:
    seed: int = 0
    # guidance scale (1 = off); None: DEFAULT_CFG's audio scale when the prompt opens an audio span,
    # else its image scale
    cfg: float | None = None
    temperature: str | None = None  # "0.8" or "text=0.8,image=1.0"
    top_k: str | None = None
    top_p: str | None = None
    max_new_tokens: int = 512
    num_samples: int = 1
    max_audio_seconds: float = 10.0
    stop_after_span: bool = False  # end each sample when its first image / clip / box closes
    image_size: str | None = None  # "96x48": an image of that many pixels (W x H), snapped to whole codes
    aspect: str | None = None  # "2:1": an image of that aspect within the image tokenizer's max_tokens


def per_modality(value: str | None, name: str, cast, every=MODALITIES) -> dict[str, object]:
    """'0.8' -> every modality (of `every`); 'text=0.8,image=1' -> those modalities."""
    if value is None:
        return {}
    value = str(value).strip()
    try:
        if "=" not in value:
            return {m: cast(value) for m in every}
        out = {}
        for item in value.split(","):
            k, v = (s.strip() for s in item.split("=", 1))
            if k not in MODALITIES:
                raise UserError(f"--{name}: unknown modality '{k}' (valid: {', '.join(MODALITIES)})")
            out[k] = cast(v)
        return out
    except ValueError:
        raise UserError(f"--{name} {value!r}: expected a number or modality=number pairs") from None


def sampling_from_flags(temperature=None, top_k=None, top_p=None) -> ModalitySampling:
    """The default per-modality sampling with the given flags laid over it."""
    base = ModalitySampling.default()
    temps = per_modality(temperature, "temperature", float)
    ks = per_modality(top_k, "top-k", int)
    ps = per_modality(top_p, "top-p", float)
    for m in MODALITIES:
        cur: SamplingParams = getattr(base, m)
        setattr(base, m, SamplingParams(temps.get(m, cur.temperature), ks.get(m, cur.top_k), ps.get(m, cur.top_p)))
    return base


def _pair(value: str, sep: str, flag: str, form: str) -> tuple[float, float]:
    m = re.fullmatch(rf"\s*(\d+(?:\.\d+)?)\s*{re.escape(sep)}\s*(\d+(?:\.\d+)?)\s*", str(value), flags=re.I)
    if m is None or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise UserError(f"{flag} {value!r}: expected {form}")
    return float(m.group(1)), float(m.group(2))


def requested_grid(bundle, image_size: str | None = None, aspect: str | None = None) -> tuple[int, int] | None:
    """The grid (rows, cols) of codes `--image-size WxH` or `--aspect W:H` asks for; None for neither
    (the model's own choice). A size is snapped to the nearest whole codes of the image tokenizer;
    an aspect gets `media.native_grid` within its `max_tokens`."""
    if image_size is None and aspect is None:
        return None
    if image_size is not None and aspect is not None:
        raise UserError("give --image-size or --aspect, not both")
    tok, sp = bundle.tok.image, bundle.space
    if tok is None:
        raise UserError("this model has no image tokenizer; --image-size and --aspect ask for an image")
    f = tok.downsample
    side = sp.image_max_side if sp.any_aspect else max(sp.image_grid)
    if image_size is not None:
        width, height = _pair(image_size, "x", "--image-size", "WxH in pixels, e.g. 96x48")
        rows, cols = (max(1, math.floor(v / f + 0.5)) for v in (height, width))
        what = f"--image-size {image_size}"
    else:
        a, b = _pair(aspect, ":", "--aspect", "W:H, e.g. 2:1")
        rows, cols = native_grid(a / min(a, b), b / min(a, b), tok.max_tokens, max_side=side)
        what = f"--aspect {aspect}"
    if not sp.any_aspect and (rows, cols) != tuple(sp.image_grid):
        h, w = sp.image_grid
        raise UserError(f"{what}: this model's token space (version 1) draws square images only, "
                        f"{w * f}x{h * f} pixels")
    if max(rows, cols) > side:
        raise UserError(f"{what} is {cols}x{rows} codes of {f} pixels; a side may have at most {side} codes "
                        f"({side * f} pixels)")
    return rows, cols


def grid_notes(bundle, grid: tuple[int, int], image_size: str | None) -> list[str]:
    """What the user may not expect of the grid asked for: a size that moved to whole codes, an image
    larger than the image tokenizer's `max_tokens` (the model saw none that large)."""
    rows, cols = grid
    tok = bundle.tok.image
    f, notes = tok.downsample, []
    if image_size is not None and (cols * f, rows * f) != _pair(image_size, "x", "--image-size", ""):
        notes.append(f"note: --image-size {image_size} snapped to {cols * f}x{rows * f} ({cols}x{rows} codes "
                     f"of {f} pixels)")
    if rows * cols > tok.max_tokens:
        notes.append(f"note: a {cols}x{rows}-code image is larger than the {tok.max_tokens} codes the image "
                     f"tokenizer fits images to (max_tokens)")
    return notes


def ask_for_image(space, prompt: list[int], grid: tuple[int, int], engine: Engine) -> list[int]:
    """The prompt ids with an image of `grid` opened at their end: `<boi> <size_h> <size_w>`, or just
    the sizes when the prompt ends with `<boi>` (version 1: `<boi>` alone, the one square grid)."""
    state = engine.constrainer.from_prompts([prompt])
    mode, pos = int(state.mode[0]), int(state.pos[0])
    sizes = [space.size_id(grid[0]), space.size_id(grid[1])] if space.any_aspect else []
    if mode == TEXT:
        return prompt + [space.boi] + sizes
    if mode == IMAGE and pos == 0:
        return prompt + sizes
    where = {IMAGE: "an image already begun", AUDIO: "an audio clip"}.get(mode, "a box")
    raise UserError(f"the prompt ends inside {where}; --image-size and --aspect open a new image")


def open_span_tail(space, prompt: list[int], engine: Engine) -> list[int]:
    """The prompt's tokens from its last span opener when the prompt ends inside a span, else []."""
    state = engine.constrainer.from_prompts([prompt])
    mode = int(state.mode[0])
    if mode == TEXT:
        return []
    opener = {IMAGE: space.boi, AUDIO: space.boa}.get(mode, space.box)
    return prompt[len(prompt) - 1 - prompt[::-1].index(opener):]


class _Live:
    """Streams the first sample's text and shows a bar while a media span is generated.

    open_tail: the prompt's open span (from its opener) when the prompt ends inside one."""

    def __init__(self, bundle, out: TextIO, audio_limit: int, open_tail: list[int] | None = None):
        self.b, self.out = bundle, out
        self.text_ids: list[int] = []
        self.printed = ""
        self.bar = None
        self.audio_limit = audio_limit
        self.sizes: list[int] = []  # the size tokens of the image being drawn (version 2)
        if open_tail and open_tail[0] == bundle.space.boi:
            self._open_image()
            for t in open_tail[1:]:
                self._image_token(t)

    def _open_image(self) -> None:
        sp = self.b.space
        # tokens after <boi> up to <eoi>; a version-2 image's count is known once its size tokens are out
        total = None if sp.any_aspect else sp.image_tokens
        self.sizes = []
        self.bar = tqdm(total=total, desc="image", unit="tok", leave=False, file=sys.stderr)

    def _image_token(self, tok: int) -> None:
        sp = self.b.space
        if sp.any_aspect and sp.size_range()[0] <= tok < sp.size_range()[1]:
            self.sizes.append(tok - sp.size_range()[0] + 1)
            if len(self.sizes) == 2:
                self.bar.total = sp.image_span(*self.sizes) - 2
                self.bar.refresh()
        self.bar.update(1)

    def __call__(self, row: int, tok: int, mode: int) -> None:
        if row != 0:
            return
        sp = self.b.space
        if mode == TEXT and tok not in (sp.boi, sp.boa, sp.box, sp.eos, sp.pad):
            self.text_ids.append(tok)
            text = self.b.tok.text.decode(self.text_ids)
            if not text.endswith("\ufffd") and text.startswith(self.printed):
                self.out.write(text[len(self.printed):])
                self.out.flush()
                self.printed = text
            return
        if mode == TEXT and tok == sp.boi:
            self._flush_text()
            self._open_image()
        elif mode == TEXT and tok == sp.boa:
            self._flush_text()
            self.bar = tqdm(total=self.audio_limit, desc="audio", unit="tok", leave=False, file=sys.stderr)
        elif mode in (IMAGE, AUDIO) and self.bar is not None:
            if tok in (sp.eoi, sp.eoa):
                self.bar.close()
                self.bar = None
                self.out.write("[image]" if mode == IMAGE else "[audio]")
                self.out.flush()
            elif mode == IMAGE:
                self._image_token(tok)
            else:
                self.bar.update(1)

    def _flush_text(self) -> None:
        self.text_ids.clear()
        self.printed = ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.out.write("\n")
        self.out.flush()


def run_sample(bundle, prompt: str, out: str | Path, images=(), audios=(), opts: SampleOptions | None = None,
               console: TextIO | None = None) -> list[RenderedSample]:
    """Generate `opts.num_samples` continuations of a prompt and write them to `out`."""
    opts = opts or SampleOptions()
    console = console if console is not None else sys.stdout
    out = Path(out)
    sp = bundle.space
    if opts.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {opts.num_samples}")
    if opts.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    if opts.cfg is not None and opts.cfg <= 0:
        raise UserError(f"--cfg must be > 0, got {opts.cfg}")
    sampling = sampling_from_flags(opts.temperature, opts.top_k, opts.top_p)
    grid = requested_grid(bundle, opts.image_size, opts.aspect)
    encoded = encode_prompt(prompt, bundle.tok, images, audios)
    max_audio_frames = max(1, int(opts.max_audio_seconds * sp.audio_frame_rate)) if sp.audio_n_q else None
    engine = Engine(bundle.model, sp, device=bundle.device, max_audio_frames=max_audio_frames,
                    max_image_tokens=bundle.max_image_tokens)
    if grid is not None:
        encoded = dataclasses.replace(encoded, ids=ask_for_image(sp, encoded.ids, grid, engine))
    prompt_ids = encoded.ids
    room = engine.context_room(len(prompt_ids))
    if room < 1:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {engine.max_len} "
                        f"tokens; shorten the prompt")
    max_new = min(opts.max_new_tokens, room)
    if max_new < opts.max_new_tokens:
        print(f"note: --max-new-tokens {opts.max_new_tokens} cut to {max_new} (prompt {len(prompt_ids)} + new "
              f"tokens must fit the context of {engine.max_len})", file=sys.stderr)
    if grid is not None:
        # the rest of the asked-for image: its rows (version 2: each with <eor>) and <eoi>
        need = sp.image_span(*grid) - (3 if sp.any_aspect else 1)
        if max_new < need:
            why = (f"--max-new-tokens is {opts.max_new_tokens}" if max_new == opts.max_new_tokens else
                   f"the model's context of {engine.max_len} leaves {room} after the prompt")
            raise UserError(f"a {grid[1]}x{grid[0]}-code image needs {need} new tokens; {why}")
        for note in grid_notes(bundle, grid, opts.image_size):
            print(note, file=sys.stderr)
    tail = open_span_tail(sp, prompt_ids, engine)
    cfg = opts.cfg if opts.cfg is not None else DEFAULT_CFG["audio" if prompt_ids[-1:] == [sp.boa] else "image"]
    requests = [Request(prompt_ids, max_new, sampling, seed=opts.seed + i, cfg_scale=cfg,
                        stop_after_span=opts.stop_after_span) for i in range(opts.num_samples)]
    live = _Live(bundle, console, max_audio_frames * max(1, sp.audio_n_q) if max_audio_frames else 0, tail)
    try:
        results = engine.generate(requests, on_token=live)
    finally:
        live.close()

    meta = {"cfg": cfg, "max_new_tokens": max_new,
            "sampling": {m: vars(getattr(sampling, m)) for m in MODALITIES}}
    if grid is not None:
        meta["image_grid"] = list(grid)
    rendered = write_outputs(out, bundle, prompt, encoded, tail, results, [r.seed for r in requests], meta)
    for i, rs in enumerate(rendered[1:], start=1):  # the first sample was streamed while it was generated
        text = "".join(p.text if p.kind == "text" else f"[{p.kind}]" for p in rs.parts)
        console.write(f"--- sample {i + 1} (seed {rs.seed}) ---\n{text}\n")
    return rendered

"""`anymodal sample` as a library call: prompt -> ids (`prompt.encode_prompt`) -> batched
generation (`engine.Engine`) -> files on disk (`render.write_outputs`).

Text of the first sample streams to the terminal while it is generated; a progress bar runs while
an image or audio clip is generated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from ..errors import UserError
from .constraints import AUDIO, IMAGE, TEXT
from .engine import Engine, Request
from .prompt import encode_prompt
from .render import RenderedSample, write_outputs
from .sampling import MODALITIES, ModalitySampling, SamplingParams


@dataclass
class SampleOptions:
    seed: int = 0
    cfg: float = 3.0  # guidance scale on image / audio spans (1 = off)
    temperature: str | None = None  # "0.8" or "text=0.8,image=1.0"
    top_k: str | None = None
    top_p: str | None = None
    max_new_tokens: int = 512
    num_samples: int = 1
    max_audio_seconds: float = 10.0
    stop_after_span: bool = False  # end each sample when its first image / clip / box closes


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


def open_span_tail(space, prompt: list[int], engine: Engine) -> list[int]:
    """The prompt's tokens from its last span opener when the prompt ends inside a span, else []."""
    state = engine.constrainer.from_prompts([prompt])
    mode = int(state.mode[0])
    if mode == TEXT:
        return []
    opener = {IMAGE: space.boi, AUDIO: space.boa}.get(mode, space.box)
    return prompt[len(prompt) - 1 - prompt[::-1].index(opener):]


class _Live:
    """Streams the first sample's text and shows a bar while a media span is generated."""

    def __init__(self, bundle, out: TextIO, audio_limit: int):
        self.b, self.out = bundle, out
        self.text_ids: list[int] = []
        self.printed = ""
        self.bar = None
        self.audio_limit = audio_limit

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
        if mode == TEXT and tok in (sp.boi, sp.boa):
            self._flush_text()
            total = sp.image_tokens if tok == sp.boi else self.audio_limit
            self.bar = tqdm(total=total, desc="image" if tok == sp.boi else "audio", unit="tok",
                            leave=False, file=sys.stderr)
        elif mode in (IMAGE, AUDIO) and self.bar is not None:
            if tok in (sp.eoi, sp.eoa):
                self.bar.close()
                self.bar = None
                self.out.write("[image]" if mode == IMAGE else "[audio]")
                self.out.flush()
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
    if opts.cfg <= 0:
        raise UserError(f"--cfg must be > 0, got {opts.cfg}")
    sampling = sampling_from_flags(opts.temperature, opts.top_k, opts.top_p)
    encoded = encode_prompt(prompt, bundle.tok, images, audios)
    prompt_ids = encoded.ids
    max_audio_frames = max(1, int(opts.max_audio_seconds * sp.audio_frame_rate)) if sp.audio_n_q else None
    engine = Engine(bundle.model, sp, device=bundle.device, max_audio_frames=max_audio_frames)
    room = engine.context_room(len(prompt_ids))
    if room < 1:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {engine.max_len} "
                        f"tokens; shorten the prompt")
    max_new = min(opts.max_new_tokens, room)
    if max_new < opts.max_new_tokens:
        print(f"note: --max-new-tokens {opts.max_new_tokens} cut to {max_new} (prompt {len(prompt_ids)} + new "
              f"tokens must fit the context of {engine.max_len})", file=sys.stderr)
    requests = [Request(prompt_ids, max_new, sampling, seed=opts.seed + i, cfg_scale=opts.cfg,
                        stop_after_span=opts.stop_after_span) for i in range(opts.num_samples)]
    live = _Live(bundle, console, max_audio_frames * max(1, sp.audio_n_q) if max_audio_frames else 0)
    try:
        results = engine.generate(requests, on_token=live)
    finally:
        live.close()

    meta = {"cfg": opts.cfg, "max_new_tokens": max_new,
            "sampling": {m: vars(getattr(sampling, m)) for m in MODALITIES}}
    rendered = write_outputs(out, bundle, prompt, encoded, open_span_tail(sp, prompt_ids, engine), results,
                             [r.seed for r in requests], meta)
    for i, rs in enumerate(rendered[1:], start=1):  # the first sample was streamed while it was generated
        text = "".join(p.text if p.kind == "text" else f"[{p.kind}]" for p in rs.parts)
        console.write(f"--- sample {i + 1} (seed {rs.seed}) ---\n{text}\n")
    return rendered

"""The way out: generated ids -> files. Images (of any grid: a PNG is the generated grid times the
tokenizer's downsampling) and clips are decoded with the bundle's tokenizers and written as
image_*.png / audio_*.wav (the prompt's images as prompt_image_*.png) beside
index.html, sample.md and tokens.json.

Generated text is untrusted (a model can emit `<script>`): every piece of text that reaches the
HTML page goes through `html.escape`, and media are referenced by file names we chose ourselves.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.media import map_by_shape, save_png, save_wav
from ..fileio import write_atomic
from ..tokenizers.stream import Audio, Box, Image, Text
from .engine import Result
from .prompt import Prompt


@dataclass
class Part:
    """One displayable piece of a prompt or a sample."""

    kind: str  # 'text' | 'image' | 'audio' | 'box' | 'note'
    text: str = ""  # text, or a box description
    file: str = ""  # file name inside the output dir (image / audio)
    box: tuple[float, float, float, float] | None = None  # normalized, for 'box'


@dataclass
class RenderedSample:
    parts: list[Part] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    finish: str = ""
    seed: int = 0
    problems: list[str] = field(default_factory=list)


def _html_parts(parts: list[Part]) -> str:
    out = []
    for p in parts:
        if p.kind == "text":
            out.append(f'<span class="text">{html.escape(p.text)}</span>')
        elif p.kind == "image":
            out.append(f'<img src="{html.escape(p.file, quote=True)}" alt="image" width="192" '
                       f'style="image-rendering: pixelated">')
        elif p.kind == "audio":
            out.append(f'<audio controls src="{html.escape(p.file, quote=True)}"></audio>')
        elif p.kind == "box":
            out.append(f'<code class="box">{html.escape(p.text)}</code>')
        else:
            out.append(f'<em class="note">{html.escape(p.text)}</em>')
    return "\n".join(out)


def _md_parts(parts: list[Part]) -> str:
    out = []
    for p in parts:
        if p.kind == "text":
            out.append(p.text)
        elif p.kind == "image":
            out.append(f"\n\n![image]({p.file})\n\n")
        elif p.kind == "audio":
            out.append(f"\n\n[audio]({p.file})\n\n")
        elif p.kind == "box":
            out.append(f"`{p.text}`")
        else:
            out.append(f"\n\n_{p.text}_\n\n")
    return "".join(out)


def write_page(out: Path, prompt_text: str, prompt_parts: list[Part], samples: list[RenderedSample],
               prompt_ids: list[int], meta: dict) -> None:
    """index.html, sample.md and tokens.json for one `anymodal sample` run (media already written)."""
    out.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>anymodal sample</h1>\n<h2>prompt</h2>\n<div class=\"prompt\">{_html_parts(prompt_parts)}</div>"]
    md = ["# anymodal sample\n", "## prompt\n", _md_parts(prompt_parts), "\n"]
    for i, s in enumerate(samples):
        body.append(f'<h2>sample {i + 1} <small>(seed {s.seed}, {html.escape(s.finish)}, '
                    f'{len(s.tokens)} tokens)</small></h2>\n<div class="sample">{_html_parts(s.parts)}</div>')
        md.append(f"\n## sample {i + 1} (seed {s.seed}, {s.finish}, {len(s.tokens)} tokens)\n\n")
        md.append(_md_parts(s.parts) + "\n")
        if s.problems:
            items = "".join(f"<li>{html.escape(p)}</li>" for p in s.problems)
            body.append(f'<ul class="problems">{items}</ul>')
            md.extend(f"- problem: {p}\n" for p in s.problems)
    page = (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>anymodal sample</title>\n"
        "<style>body{font-family:sans-serif;max-width:52em;margin:2em auto}"
        ".text{white-space:pre-wrap}.sample,.prompt{border:1px solid #ccc;padding:1em;margin:1em 0}"
        "img{border:1px solid #888;vertical-align:middle;margin:.3em}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )
    write_atomic(out / "index.html", page)
    write_atomic(out / "sample.md", "".join(md))
    tokens = {
        "prompt_text": prompt_text,
        "prompt": prompt_ids,
        "samples": [{"seed": s.seed, "finish": s.finish, "text": "".join(p.text for p in s.parts if p.kind == "text"),
                     "tokens": s.tokens,
                     "probs": [round(p, 6) for p in s.probs], "problems": s.problems} for s in samples],
        **meta,
    }
    write_atomic(out / "tokens.json", json.dumps(tokens))


def write_outputs(out: Path, bundle, prompt_text: str, prompt: Prompt, span_tail: list[int],
                  results: list[Result], seeds: list[int], meta: dict) -> list[RenderedSample]:
    """Every sample's media decoded and written to `out`, then the page; the samples as shown.

    span_tail: the prompt's open span (from its opener) when the prompt ends inside one, so that
    the first generated codes decode as that span."""
    out.mkdir(parents=True, exist_ok=True)
    shown = _prompt_parts(prompt, out)
    rendered = []
    n_img = n_aud = 0  # media files are numbered across samples
    tok = bundle.tok
    for i, (res, seed) in enumerate(zip(results, seeds)):
        dec = bundle.stream.decode(span_tail + res.tokens)
        rs = RenderedSample(tokens=res.tokens, probs=res.probs, finish=res.finish, seed=seed,
                            problems=list(dec.problems))
        imgs = [s for s in dec.segments if isinstance(s, Image)]
        pics = iter(decode_images([s.codes for s in imgs], tok.image) if imgs and tok.image is not None else [])
        for s in dec.segments:
            if isinstance(s, Text):
                rs.parts.append(Part("text", s.text))
            elif isinstance(s, Image):
                pic = next(pics, None)
                if pic is None:
                    rs.parts.append(Part("note", "image (no image tokenizer to decode it)"))
                    continue
                name = f"image_{i}_{n_img}.png"
                save_png(pic, out / name)
                rs.parts.append(Part("image", file=name))
                n_img += 1
            elif isinstance(s, Audio):
                if tok.audio is None or s.codes.shape[0] == 0:
                    rs.parts.append(Part("note", "empty audio clip"))
                    continue
                name = f"audio_{i}_{n_aud}.wav"
                save_wav(decode_audio(s.codes, tok.audio), tok.audio.sample_rate, out / name)
                rs.parts.append(Part("audio", file=name))
                n_aud += 1
            elif isinstance(s, Box):
                rs.parts.append(Part("box", text="<box>[{:.3f}, {:.3f}, {:.3f}, {:.3f}]</box>".format(*s.as_tuple()),
                                     box=s.as_tuple()))
        rendered.append(rs)
    write_page(out, prompt_text, shown, rendered, prompt.ids, meta)
    return rendered


def _prompt_parts(prompt: Prompt, out: Path) -> list[Part]:
    """The prompt as the page shows it: its text, and its images as the model saw them (written)."""
    parts: list[Part] = []
    n_prompt = 0
    for p, px in zip(prompt.parts, prompt.pixels):
        if p.kind == "text":
            parts.append(Part("text", p.value))
        elif p.kind == "image":
            name = f"prompt_image_{n_prompt}.png"
            save_png(px, out / name)
            parts.append(Part("image", file=name))
            n_prompt += 1
        else:
            parts.append(Part("note", f"audio: {Path(p.value).name}"))
    return parts


@torch.inference_mode()
def decode_images(codes: list[np.ndarray], image_tok) -> list[np.ndarray]:
    """Code grids [h, w] of any shapes -> uint8 [h * f, w * f, 3] pixels (f the tokenizer's
    downsampling), in order; the grids of one shape are decoded as one batch."""
    dev = next(image_tok.parameters()).device if codes else None

    def decode(part: list[np.ndarray]) -> np.ndarray:
        x = image_tok.decode(torch.from_numpy(np.stack([np.asarray(c, dtype=np.int64) for c in part])).to(dev))
        return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [b, H, W, 3]

    return map_by_shape(codes, decode)


@torch.inference_mode()
def decode_audio(codes: np.ndarray, audio_tok) -> np.ndarray:
    """codes [frames, n_q] -> float32 wave [T]."""
    dev = next(audio_tok.parameters()).device
    return audio_tok.decode(torch.from_numpy(np.asarray(codes, dtype=np.int64))[None].to(dev))[0].float().cpu().numpy()

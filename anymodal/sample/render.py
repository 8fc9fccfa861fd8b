"""Writing samples to disk: index.html, sample.md, image_*.png, tokens.json (audio_*.wav are
written by the data layer's one WAV writer, `anymodal.data.media.save_wav`).

Generated text is untrusted (a model can emit `<script>`): every piece of text that reaches the
HTML page goes through `html.escape`, and media are referenced by file names we chose ourselves.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import write_atomic


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

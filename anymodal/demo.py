"""`anymodal demo`: the whole pipeline on the embedded demo world, in one resumable command.

Each stage runs the public CLI in a subprocess (exactly what a user would type), writes its
outputs under `out/`, and leaves a `.done/<stage>` marker when it succeeds, so an interrupted
demo picks up at the first unfinished stage (and the trainers themselves resume mid-stage).
The default recipe fits about 30 minutes on a 2-core CPU; with CUDA present the `gpu` overrides
train longer and larger.
"""

from __future__ import annotations

import html
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import load_config
from .errors import UserError


@dataclass
class WorldStage:
    train_docs: int = 6000
    val_docs: int = 300
    train_seed: int = 0
    val_seed: int = 1


@dataclass
class DemoConfig:
    world: WorldStage = field(default_factory=WorldStage)
    text_tokenizer: str = "tokenizer/text_demo"
    image_tokenizer: str = "tokenizer/image_demo"
    audio_tokenizer: str = "tokenizer/audio_demo"
    image_tokenizer_overrides: list[str] = field(default_factory=list)
    audio_tokenizer_overrides: list[str] = field(default_factory=list)
    train: str = "train/demo"
    train_overrides: list[str] = field(default_factory=list)
    gpu_train_overrides: list[str] = field(default_factory=list)  # added when CUDA is present
    eval_limit: int = 100  # documents per kind in eval
    budget_minutes: float = 30.0  # reported against; stages are sized to fit it
    prompts: list[str] = field(default_factory=lambda: [
        "a large red circle in the center",
        "a small blue square at the top left and a large green triangle at the bottom right",
        "a large purple triangle at the top",  # unseen combination
        "a small orange square at the right",  # unseen combination
    ])
    ground_queries: list[str] = field(default_factory=lambda: ["the red circle", "the blue square"])
    speech_prompts: list[str] = field(default_factory=lambda: ["say: a small red circle at the top left"])


class Demo:
    def __init__(self, cfg: DemoConfig, out: Path):
        self.cfg = cfg
        self.out = out
        self.done_dir = out / ".done"
        self.timings: dict[str, float] = {}
        self.cuda = _cuda_available()

    # ---- plumbing ------------------------------------------------------------------------------
    def anymodal(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "anymodal.cli", *args]
        print(f"\n$ anymodal {' '.join(shlex.quote(a) for a in args)}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        r = subprocess.run(cmd, env=env)
        if r.returncode != 0:
            raise UserError(f"demo stage failed (exit {r.returncode}): anymodal {' '.join(args)}")

    def stage(self, name: str, fn) -> None:
        marker = self.done_dir / name
        if marker.exists():
            print(f"[demo] {name}: done already, skipped", flush=True)
            return
        print(f"\n[demo] === {name} ===", flush=True)
        t0 = time.time()
        fn()
        self.timings[name] = time.time() - t0
        self.done_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"seconds": self.timings[name]}))

    # ---- stages --------------------------------------------------------------------------------
    def run(self) -> dict:
        c, o = self.cfg, self.out
        o.mkdir(parents=True, exist_ok=True)
        world, toks, tokens = o / "world", o / "tokenizers", o / "tokens"
        t_start = time.time()
        self.stage("world", lambda: (
            self.anymodal("world", "--out", str(world), "--split", "train", "--docs", str(c.world.train_docs),
                          "--seed", str(c.world.train_seed)),
            self.anymodal("world", "--out", str(world), "--split", "val", "--docs", str(c.world.val_docs),
                          "--seed", str(c.world.val_seed)),
        ))
        train_shards = str(world / "train-*.tar")
        val_shards = str(world / "val-*.tar")
        self.stage("text_tokenizer", lambda: self.anymodal(
            "tokenizer", "train", "text", "--config", c.text_tokenizer, f"input={train_shards}",
            "--out", str(toks / "text")))
        self.stage("image_tokenizer", lambda: self.anymodal(
            "tokenizer", "train", "image", "--config", c.image_tokenizer, f"data.train_shards=[{train_shards}]",
            f"data.val_shards=[{val_shards}]", *c.image_tokenizer_overrides, "--out", str(toks / "image"), *_resume_flag(toks / "image")))
        self.stage("audio_tokenizer", lambda: self.anymodal(
            "tokenizer", "train", "audio", "--config", c.audio_tokenizer, f"data.train={train_shards}",
            f"data.val={val_shards}", *c.audio_tokenizer_overrides, "--out", str(toks / "audio"), *_resume_flag(toks / "audio")))
        self.stage("tokenizer_set", lambda: _assemble(toks))
        self.stage("prepare", lambda: (
            self.anymodal("prepare", "--tokenizers", str(toks), "--input", train_shards, "--out", str(tokens / "train")),
            self.anymodal("prepare", "--tokenizers", str(toks), "--input", val_shards, "--out", str(tokens / "val")),
        ))
        run_dir = o / "run"
        train_over = [f"run_dir={run_dir}", f"data={tokens / 'train'}", f"val_data={tokens / 'val'}",
                      *c.train_overrides]
        if self.cuda:
            train_over += c.gpu_train_overrides
        self.stage("train", lambda: self.anymodal("train", "--config", c.train, *train_over, "--resume"))
        bundle = o / "bundle"
        self.stage("export", lambda: self.anymodal("export", "--run", str(run_dir), "--out", str(bundle)))
        self.stage("eval", lambda: self.anymodal("eval", "--model", str(bundle), "--data", val_shards,
                                                 "--out", str(o / "metrics.json"), "--limit", str(c.eval_limit)))
        self.stage("showcase", lambda: self.showcase(bundle, world))
        report = write_report(o, self.cfg)
        total = time.time() - t_start
        metrics = json.loads((o / "metrics.json").read_text())
        print_metrics(metrics)
        print(f"\n[demo] finished in {total / 60:.1f} min (budget {c.budget_minutes:.0f} min); report: {report}")
        return metrics

    def showcase(self, bundle: Path, world: Path) -> None:
        """Fixed prompts for the report: text→image (seen and unseen), grounding, speech."""
        c, show = self.cfg, self.out / "showcase"
        for i, prompt in enumerate(c.prompts):
            self.anymodal("sample", "--model", str(bundle), "--prompt", prompt + "<boi>", "--out",
                          str(show / f"t2i_{i}"), "--seed", "0", "--cfg", "3", "--max-new-tokens", "200", "--stop-after-span")
        example = _first_val_image(world, show)
        if example is not None:
            for i, q in enumerate(c.ground_queries):
                self.anymodal("ground", "--model", str(bundle), "--image", str(example), "--query", q,
                              "--out", str(show / f"ground_{i}.png"))
        for i, prompt in enumerate(c.speech_prompts):
            self.anymodal("sample", "--model", str(bundle), "--prompt", prompt + "<boa>", "--out",
                          str(show / f"tts_{i}"), "--seed", "0", "--max-new-tokens", "400", "--stop-after-span")


def _resume_flag(out: Path) -> list[str]:
    """Tokenizer trainers refuse `--resume` without a checkpoint and a fresh start over one."""
    ckpts = out / "checkpoints"
    return ["--resume"] if ckpts.is_dir() and any(ckpts.iterdir()) else []


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _assemble(toks: Path) -> None:
    from .tokenizers import assemble_tokenizer_set

    assemble_tokenizer_set(toks, toks / "text", toks / "image", toks / "audio")


def _first_val_image(world: Path, show: Path) -> Path | None:
    """Save the first image of the val split as a PNG to ground phrases in."""
    from .data.media import save_png
    from .data.reader import iter_documents

    for doc in iter_documents(sorted(str(p) for p in world.glob("val-*.tar"))):
        for seg in doc.segments:
            if "image" in seg:
                show.mkdir(parents=True, exist_ok=True)
                save_png(seg["image"], show / "ground_input.png")
                return show / "ground_input.png"
    return None


METRIC_ROWS = [
    ("t2i accuracy", "t2i_accuracy", "≥ 0.80"),
    ("a2i accuracy", "a2i_accuracy", "≥ 0.60"),
    ("caption accuracy", "caption_accuracy", "≥ 0.90"),
    ("grounding Acc@0.5", "grounding_acc50", "≥ 0.80"),
    ("grounding mIoU", "grounding_miou", ""),
    ("refer accuracy", "refer_accuracy", ""),
    ("ASR WER", "asr_wer", "≤ 0.15"),
    ("TTS round-trip WER", "tts_wer", ""),
]


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_metrics(m: dict) -> None:
    unseen = m.get("unseen", {})
    print(f"\n{'metric':<22}{'all':>10}{'unseen':>10}{'goal':>10}")
    for label, key, goal in METRIC_ROWS:
        print(f"{label:<22}{_fmt(m.get(key)):>10}{_fmt(unseen.get(key)):>10}{goal:>10}")
    for mod, v in (m.get("bits_per_token") or {}).items():
        print(f"{'bits/token ' + mod:<22}{_fmt(v):>10}")


def write_report(out: Path, cfg: DemoConfig) -> Path:
    """runs/demo/report.html: metrics, loss curves, tokenizer reconstructions, generations."""
    m = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    unseen = m.get("unseen", {})

    def rel(p: Path) -> str:
        return html.escape(os.path.relpath(p, out))

    def imgs(paths, width=192):
        return "".join(f'<figure><img src="{rel(p)}" width="{width}"><figcaption>{html.escape(p.parent.name)}'
                       f"</figcaption></figure>" for p in paths)

    parts = ["<!doctype html><meta charset='utf-8'><title>anymodal demo</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}figure{display:inline-block;"
             "margin:4px}td,th{padding:2px 10px;text-align:right}img{image-rendering:pixelated}</style>",
             "<h1>anymodal demo report</h1><h2>Metrics (val split)</h2><table><tr><th>metric</th><th>all</th>"
             "<th>unseen</th><th>goal</th></tr>"]
    for label, key, goal in METRIC_ROWS:
        parts.append(f"<tr><td>{label}</td><td>{_fmt(m.get(key))}</td><td>{_fmt(unseen.get(key))}</td>"
                     f"<td>{html.escape(goal)}</td></tr>")
    parts.append("</table>")
    curves = sorted((out / "run").glob("*.png"))
    parts.append("<h2>Loss curves</h2>" + imgs(curves, 480))
    recon = sorted((out / "tokenizers").glob("*/*.png"))
    parts.append("<h2>Tokenizer reconstructions</h2>" + imgs(recon, 480))
    show = out / "showcase"
    for i, prompt in enumerate(cfg.prompts):
        parts.append(f"<h3>t2i: {html.escape(prompt)}</h3>" + imgs(sorted((show / f"t2i_{i}").glob("image_*.png"))))
    parts.append("<h2>Grounding</h2>" + imgs(sorted(show.glob("ground_*.png"))))
    parts.append("<h2>Speech</h2>")
    for wav in sorted(show.glob("tts_*/audio_*.wav")):
        parts.append(f'<p>{html.escape(wav.parent.name)} <audio controls src="{rel(wav)}"></audio></p>')
    report = out / "report.html"
    report.write_text("\n".join(parts))
    return report


def run_demo(out: str = "runs/demo", config: str = "demo", overrides=()) -> dict:
    cfg = load_config(DemoConfig, config, overrides)
    return Demo(cfg, Path(out)).run()

"""`anymodal demo`: the whole pipeline on the embedded demo world, in one resumable command.

Each stage runs the public CLI in a subprocess (exactly what a user would type), writes its
outputs under `out/`, and leaves a `.done/<stage>` marker when it succeeds, so an interrupted
demo picks up at the first unfinished stage (and the trainers themselves resume mid-stage).
The default recipe trains each stage for a number of steps, about 30 minutes on a 2-core CPU at
its usual speed; with CUDA present the `gpu` overrides train a larger model for fixed minutes.
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

import torch
from tqdm import tqdm

from .config import load_config
from .data.cues import cue
from .data.media import save_png, save_wav
from .data.reader import iter_documents
from .errors import UserError
from .eval.metrics import format_aspect_table
from .fileio import write_atomic
from .sample.bundle import load_bundle, set_threads
from .sample.ground import ground_image
from .sample.sampling import DEFAULT_CFG
from .sample.session import SampleOptions, run_sample
from .tokenizers import assemble_tokenizer_set


@dataclass
class WorldStage:
    train_docs: int = 6000
    val_docs: int = 300
    train_seed: int = 0
    val_seed: int = 1
    overrides: list[str] = field(default_factory=list)  # world config keys for both splits
    train_overrides: list[str] = field(default_factory=list)  # e.g. the training mix of kinds
    val_overrides: list[str] = field(default_factory=list)  # e.g. equal kinds, so eval sees enough of each
    # Further training sources, each its own world documents tokenized apart and mixed into training
    # by weight (the main world gets the rest): [{name, docs, seed, weight, overrides, audio}, ...]
    extra_sources: list[dict] = field(default_factory=list)


@dataclass
class ExtraSource:
    name: str
    docs: int
    weight: float  # share of an epoch's tokens
    seed: int = 7
    overrides: list[str] = field(default_factory=list)
    audio: bool = False

    @staticmethod
    def parse(items: list[dict]) -> list[ExtraSource]:
        try:
            out = [ExtraSource(**item) for item in items]
        except TypeError as e:
            raise UserError(f"world.extra_sources: {e} (keys: name, docs, weight, seed, overrides, audio)") from None
        if sum(x.weight for x in out) >= 1.0 or any(x.weight <= 0 or x.docs < 1 for x in out):
            raise UserError("world.extra_sources: weights must be positive and sum below 1 (the main world gets the rest)")
        if len({x.name for x in out} | {"world"}) != len(out) + 1:
            raise UserError("world.extra_sources: names must be distinct and not 'world'")
        return out


@dataclass
class DemoConfig:
    world: WorldStage = field(default_factory=WorldStage)
    text_tokenizer: str = "tokenizer/text_demo"
    image_tokenizer: str = "tokenizer/image_demo"
    audio_tokenizer: str = "tokenizer/audio_demo"
    text_tokenizer_overrides: list[str] = field(default_factory=list)
    image_tokenizer_overrides: list[str] = field(default_factory=list)
    audio_tokenizer_overrides: list[str] = field(default_factory=list)
    train: str = "train/demo"
    train_overrides: list[str] = field(default_factory=list)
    gpu_train_overrides: list[str] = field(default_factory=list)  # added when CUDA is present
    eval_limit: int = 100  # documents per kind in eval
    budget_minutes: float = 30.0  # reported against; stages are sized to fit it
    # in the demo world's phrase order, the place first (world `phrase_order: position_first`)
    prompts: list[str] = field(default_factory=lambda: [
        "in the center a large red circle",
        "at the top left a small blue square and at the bottom right a large green triangle",
        "at the top a large purple triangle",  # unseen combination
        "at the right a small orange square",  # unseen combination
        "a wide picture: at the left a large green circle",  # a non-square canvas
    ])
    ground_queries: list[str] = field(default_factory=list)  # [] = every object of the showcase picture
    speech_prompts: list[str] = field(default_factory=lambda: ["say: at the top left a small red circle"])


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
        self.stage("world", lambda: (
            self.anymodal("world", "--out", str(world), "--split", "train", "--docs", str(c.world.train_docs),
                          "--seed", str(c.world.train_seed), *c.world.overrides, *c.world.train_overrides),
            self.anymodal("world", "--out", str(world), "--split", "val", "--docs", str(c.world.val_docs),
                          "--seed", str(c.world.val_seed), *c.world.overrides, *c.world.val_overrides),
        ))
        extras = ExtraSource.parse(c.world.extra_sources)
        for x in extras:
            self.stage(f"world_{x.name}", lambda x=x: self.anymodal(
                "world", "--out", str(world / x.name), "--split", "train", "--docs", str(x.docs), "--seed", str(x.seed),
                *([] if x.audio else ["--no-audio"]), *c.world.overrides, *x.overrides))
        train_shards = str(world / "train-*.tar")
        val_shards = str(world / "val-*.tar")
        self.stage("text_tokenizer", lambda: self.anymodal(
            "tokenizer", "train", "text", "--config", c.text_tokenizer, f"input={train_shards}",
            *c.text_tokenizer_overrides, "--out", str(toks / "text")))
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
            *(self.anymodal("prepare", "--tokenizers", str(toks), "--input", str(world / x.name / "train-*.tar"),
                            "--out", str(tokens / x.name)) for x in extras),
        ))
        run_dir = o / "run"
        # task_eval_data only matters where the recipe sets task_eval_every
        data = str(tokens / "train")
        if extras:  # a weighted mixture (anymodal.data.mixture)
            main = 1.0 - sum(x.weight for x in extras)
            data = "[" + ", ".join([f"{{path: {data}, weight: {main:g}, name: world}}"] + [
                f"{{path: {tokens / x.name}, weight: {x.weight:g}, name: {x.name}}}" for x in extras]) + "]"
        train_over = [f"run_dir={run_dir}", f"data={data}", f"val_data={tokens / 'val'}",
                      f"task_eval_data={val_shards}", *c.train_overrides]
        if self.cuda:
            train_over += c.gpu_train_overrides
        self.stage("train", lambda: self.anymodal("train", "--config", c.train, *train_over, "--resume"))
        bundle = o / "bundle"
        self.stage("export", lambda: self.anymodal("export", "--run", str(run_dir), "--out", str(bundle)))
        self.stage("eval", lambda: self.anymodal("eval", "--model", str(bundle), "--data", val_shards,
                                                 "--out", str(o / "metrics.json"), "--limit", str(c.eval_limit),
                                                 "--examples", str(o / "eval_examples.jsonl")))
        self.stage("showcase", lambda: self.showcase(bundle, world))
        report = write_report(o, self.cfg)
        total = sum(stage_seconds(o).values())
        metrics = json.loads((o / "metrics.json").read_text())
        print_metrics(metrics)
        print(f"\n[demo] stages took {total / 60:.1f} min in all (budget {c.budget_minutes:.0f} min); report: {report}")
        return metrics

    def showcase(self, bundle_dir: Path, world: Path) -> None:
        """Fixed prompts for the report: draw (seen and unseen pairs), describe, ground, hear, speak.

        Runs in this process with the library calls behind `anymodal sample` / `ground`, so the
        bundle loads once instead of once per prompt.
        """

        c, show = self.cfg, self.out / "showcase"
        bundle = load_bundle(bundle_dir)
        set_threads(bundle, "auto")
        span = dict(seed=0, stop_after_span=True)
        greedy_text = SampleOptions(seed=0, temperature="0", max_new_tokens=48)
        image_budget = bundle.tok.space.image_max_span(bundle.tok.image.max_tokens)  # the largest grid it may pick
        draw = SampleOptions(cfg=DEFAULT_CFG["image"], max_new_tokens=image_budget, **span)
        jobs = [(f"t2i_{i}", p + "<boi>", (), (), draw) for i, p in enumerate(c.prompts)]
        picture, clip = _showcase_inputs(world, show)
        # media go before the prompt text, so each prompt is the media followed by its task cue
        if picture is not None:
            jobs.append(("describe", cue("i2t"), (str(picture),), (), greedy_text))
        if clip is not None:
            jobs.append(("hear", cue("asr"), (), (str(clip),), greedy_text))
            # the cue alone, as training ended a2i prompts: a model trained to say what it heard
            # first (world.a2i_answer transcript_image) writes that, then draws; in a world of
            # pictures alone `<boi>` always followed the cue
            hear_draw = SampleOptions(cfg=DEFAULT_CFG["image"], temperature="text=0",
                                      max_new_tokens=48 + image_budget, **span)
            jobs.append(("a2i", cue("a2i"), (), (str(clip),), hear_draw))
        jobs += [(f"tts_{i}", p + "<boa>", (), (), SampleOptions(cfg=DEFAULT_CFG["audio"], max_new_tokens=1200, **span))
                 for i, p in enumerate(c.speech_prompts)]
        with open(os.devnull, "w") as quiet:
            for name, prompt, images, audios, opts in tqdm_iter(jobs, "showcase"):
                run_sample(bundle, prompt, show / name, images=images, audios=audios, opts=opts, console=quiet)
        if picture is not None:
            results = {}
            for i, q in enumerate(showcase_queries(c, show)):
                results[q] = ground_image(bundle, picture, q, out=show / f"ground_{i}.png")
            write_atomic(show / "ground.json", json.dumps(results, indent=1))


def tqdm_iter(items: list, desc: str):
    return tqdm(items, desc=desc, unit="prompt", file=sys.stderr)


def showcase_queries(cfg: DemoConfig, show: Path) -> list[str]:
    """The grounding phrases: the configured ones, or one per object of the showcase picture."""
    if cfg.ground_queries:
        return list(cfg.ground_queries)
    objects = show / "input_objects.json"
    scene = json.loads(objects.read_text()) if objects.is_file() else []
    return [f"the {o['colour']} {o['shape']}" for o in scene]


def _showcase_inputs(world: Path, show: Path) -> tuple[Path | None, Path | None]:
    """The first val image with two or more objects (PNG, at its own size) and the first val
    speech clip (WAV)."""

    picture = clip = None
    show.mkdir(parents=True, exist_ok=True)
    for doc in iter_documents(sorted(str(p) for p in world.glob("val-*.tar")), image_size=None):
        for seg in doc.segments:
            if picture is None and "image" in seg and len(doc.meta.get("objects", [])) >= 2:
                picture = show / "input_image.png"
                save_png(seg["image"], picture)
                write_atomic(show / "input_objects.json", json.dumps(doc.meta["objects"]))
            if clip is None and "audio" in seg and doc.meta.get("transcript"):
                clip = show / "input_speech.wav"
                save_wav(seg["audio"], 16000, clip)  # the reader's default rate
                (show / "input_speech.txt").write_text(doc.meta["transcript"])
        if picture is not None and clip is not None:
            break
    return picture, clip


def _resume_flag(out: Path) -> list[str]:
    """Tokenizer trainers refuse `--resume` without a checkpoint and a fresh start over one."""
    ckpts = out / "checkpoints"
    return ["--resume"] if ckpts.is_dir() and any(ckpts.iterdir()) else []


def _cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except ImportError:
        return False


def _assemble(toks: Path) -> None:
    assemble_tokenizer_set(toks, toks / "text", toks / "image", toks / "audio")


# label, metrics.json key, the demo's goals ("must" for a fresh CPU run, "aim" beyond it)
METRIC_ROWS = [
    ("t2i accuracy", "t2i_accuracy", "≥ 0.50; unseen ≥ 0.25", "≥ 0.80; unseen ≥ 0.60"),
    ("a2i accuracy", "a2i_accuracy", "≥ 0.25", "≥ 0.60"),
    ("caption accuracy", "caption_accuracy", "≥ 0.50", "≥ 0.90"),
    ("grounding Acc@0.5", "grounding_acc50", "≥ 0.70", "≥ 0.90"),
    ("grounding mIoU", "grounding_miou", "", ""),
    ("refer accuracy", "refer_accuracy", "≥ 0.70", "≥ 0.90"),
    ("ASR WER", "asr_wer", "≤ 0.50", "≤ 0.15"),
    ("TTS round-trip WER", "tts_wer", "", ""),
]


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_metrics(m: dict) -> None:
    unseen = m.get("unseen", {})
    print(f"\n{'metric':<22}{'all':>10}{'unseen':>10}   {'must':<24}{'aim'}")
    for label, key, must, aim in METRIC_ROWS:
        print(f"{label:<22}{_fmt(m.get(key)):>10}{_fmt(unseen.get(key)):>10}   {must:<24}{aim}")
    for mod, v in (m.get("bits_per_token") or {}).items():
        print(f"{'bits/token ' + mod:<22}{_fmt(v):>10}")
    aspects = format_aspect_table(m.get("by_aspect") or {})
    if aspects:
        print("\n" + aspects)


def stage_seconds(out: Path) -> dict[str, float]:
    """Wall-clock seconds of every finished stage, from the `.done` markers (earlier runs too)."""
    times = {}
    for marker in sorted((out / ".done").glob("*")):
        try:
            times[marker.name] = float(json.loads(marker.read_text())["seconds"])
        except (ValueError, KeyError, TypeError):
            continue
    return times


def _sample_text(d: Path) -> str:
    try:
        return json.loads((d / "tokens.json").read_text())["samples"][0].get("text", "")
    except (OSError, ValueError, KeyError, IndexError):
        return ""


def write_report(out: Path, cfg: DemoConfig) -> Path:
    """runs/demo/report.html: metrics, timings, loss curves, tokenizer reconstructions, generations."""
    m = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    unseen = m.get("unseen", {})
    show = out / "showcase"
    esc = html.escape

    def rel(p: Path) -> str:
        return esc(os.path.relpath(p, out), quote=True)

    def img(p: Path, width=192, caption="") -> str:
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        return f'<figure><img src="{rel(p)}" width="{width}">{cap}</figure>' if p.is_file() else ""

    def audio(p: Path, caption="") -> str:
        return (f'<p>{esc(caption)} <audio controls src="{rel(p)}"></audio></p>' if p.is_file() else "")

    parts = ["<!doctype html><meta charset='utf-8'><title>anymodal demo</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}figure{display:inline-block;"
             "margin:4px;vertical-align:top}td,th{padding:2px 10px;text-align:right}td:first-child{text-align:left}"
             "img{image-rendering:pixelated;border:1px solid #999}q{font-style:italic}</style>",
             "<h1>anymodal demo report</h1><h2>Metrics (val split, <code>anymodal eval</code>)</h2>"
             "<table><tr><th>metric</th><th>all</th><th>unseen</th><th>must</th><th>aim</th></tr>"]
    for label, key, must, aim in METRIC_ROWS:
        parts.append(f"<tr><td>{label}</td><td>{_fmt(m.get(key))}</td><td>{_fmt(unseen.get(key))}</td>"
                     f"<td>{esc(must)}</td><td>{esc(aim)}</td></tr>")
    for mod, v in (m.get("bits_per_token") or {}).items():
        parts.append(f"<tr><td>bits/token {esc(mod)}</td><td>{_fmt(v)}</td><td></td><td></td><td></td></tr>")
    parts.append("</table>")
    times = stage_seconds(out)
    if times:
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{v / 60:.1f}</td></tr>" for k, v in times.items())
        parts.append(f"<h2>Stages</h2><table><tr><th>stage</th><th>minutes</th></tr>{rows}"
                     f"<tr><th>total</th><th>{sum(times.values()) / 60:.1f}</th></tr></table>")
    run = out / "run"
    parts.append("<h2>Learning curve: task metrics against minutes</h2>" + img(run / "tasks.png", 640))
    parts.append("<h2>Loss curves</h2>" + "".join(img(p, 420) for p in sorted(run.glob("loss*.png"))))
    toks = out / "tokenizers"
    grids = sorted((toks / "image" / "val").glob("*.png"))
    parts.append("<h2>Image tokenizer: originals and reconstructions</h2>" + (img(grids[-1], 640) if grids else ""))
    parts.append("<h2>Audio codec: originals and reconstructions</h2>")
    for spec in sorted((toks / "audio" / "samples").glob("final_*_spec.png")):
        stem = spec.name[: -len("_spec.png")]
        parts.append(img(spec, 480) + audio(spec.with_name(stem + "_orig.wav"), "original")
                     + audio(spec.with_name(stem + "_recon.wav"), "reconstruction"))
    parts.append("<h2>Draw: text → image (fixed seed, CFG 3)</h2>")
    for i, prompt in enumerate(cfg.prompts):
        for p in sorted((show / f"t2i_{i}").glob("image_*.png")):
            parts.append(img(p, 160, prompt))
    parts.append("<h2>Describe: image → text</h2>" + img(show / "input_image.png", 160)
                 + f"<p>model: <q>{esc(_sample_text(show / 'describe'))}</q></p>")
    g = json.loads((show / "ground.json").read_text()) if (show / "ground.json").is_file() else {}
    parts.append("<h2>Ground: phrase → box</h2>" + "".join(
        img(show / f"ground_{i}.png", 192, f"{q}: {g.get(q, {}).get('box')}") for i, q in enumerate(g)))
    truth = (show / "input_speech.txt").read_text() if (show / "input_speech.txt").is_file() else ""
    parts.append("<h2>Hear: speech → text, speech → image</h2>" + audio(show / "input_speech.wav", "input")
                 + f"<p>spoken: <q>{esc(truth)}</q><br>model: <q>{esc(_sample_text(show / 'hear'))}</q></p>"
                 + "".join(img(p, 160, "drawn from the speech") for p in sorted((show / "a2i").glob("image_*.png"))))
    parts.append("<h2>Speak: text → speech</h2>")
    for i, prompt in enumerate(cfg.speech_prompts):
        for wav in sorted((show / f"tts_{i}").glob("audio_*.wav")):
            parts.append(audio(wav, prompt))
    return write_atomic(out / "report.html", "\n".join(parts))


def run_demo(out: str = "runs/demo", config: str = "demo", overrides=()) -> dict:
    cfg = load_config(DemoConfig, config, overrides)
    return Demo(cfg, Path(out)).run()

"""Throughput of `anymodal prepare` (raw demo-world shards -> token shards), documents per second,
with one worker process and with one per core, per document kind, and the bare encode rates of
the tokenizers beside them; prints JSON.

- `workers_N`: the demo mix (configs/world/demo.yaml) with N worker processes;
- `by_kind`: docs/s of a world of that kind alone, one worker (what each kind costs);
- `encode`: the tokenizers alone, one thread: text documents/s, images/s (batches of 64), seconds
  of speech encoded per second (clips one by one; bucketed by length in batches of 8; and all at
  once through `encode_clips`, as prepare encodes them).

- `vs_baseline` (with `--baseline REV`): the demo mix prepared by the code of git revision REV and
  by the working tree, alternately in fresh processes on the same world and tokenizers, `--reps`
  times each; medians and their ratio: of documents/s from the call to the end (`speedup_median`,
  start-up included), and of the worker time per document, the sum of the shards' own seconds
  (`work_speedup_median`, what a long prepare runs at). `--baseline-world DIR` compares on DIR's
  train shards instead of a new world of `--baseline-docs` (a `make demo` world with its trained
  tokenizers: `--baseline-world runs/demo/world --tokenizers runs/demo/tokenizers`).

The tokenizers have the demo recipes' shapes (text BPE 1200 pieces, the image and audio codecs of
configs/tokenizer/*_demo.yaml, or the default configs when a recipe is missing) with untrained
weights: encoding costs the same as with trained ones. Pass `--tokenizers DIR` to use a real set.

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/prepare_throughput.py [--docs 300] \
        [--baseline REV --baseline-docs 2000 --reps 3] [--baseline-world runs/demo/world]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def demo_shaped_tokenizers(out: Path, world: Path) -> Path:
    import yaml

    from anymodal.config import configs_root, load_config
    from anymodal.data.reader import iter_documents
    from anymodal.tokenizers import assemble_tokenizer_set
    from anymodal.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
    from anymodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, load_image_config
    from anymodal.tokenizers.text import TextTokenizerConfig, train_text_tokenizer

    texts = [d.text for d in iter_documents(str(world / "*.tar"), images=False, audio=False)]
    train_text_tokenizer(TextTokenizerConfig(vocab_size=1200, loc_bins=64), texts).save(out / "text")
    image_recipe = configs_root() / "tokenizer" / "image_demo.yaml"
    icfg = load_image_config(str(image_recipe)) if image_recipe.is_file() else ImageTokenizerConfig()
    icfg.quantizer.kmeans_init = False
    ImageTokenizer(icfg).save(out / "image")
    audio_recipe = configs_root() / "tokenizer" / "audio_demo.yaml"
    model = (yaml.safe_load(audio_recipe.read_text()) or {}).get("model", {}) if audio_recipe.is_file() else {}
    acfg = load_config(AudioTokenizerConfig, data={**model, "kmeans_init": False})
    AudioTokenizer(acfg).save(out / "audio")
    assemble_tokenizer_set(out, out / "text", out / "image", out / "audio")
    return out


KINDS = ("t2i", "i2t", "ground", "refer", "asr", "tts", "a2i", "story", "prose")


def encode_rates(toks: Path, world: Path) -> dict:
    """The tokenizers alone on the world's documents, one thread."""
    import math

    import numpy as np
    import torch

    from anymodal.data.reader import iter_documents
    from anymodal.tokenizers import load_tokenizers

    torch.set_num_threads(1)
    tok = load_tokenizers(toks)
    docs = list(iter_documents(str(world / "*.tar"), image_size=tok.image.resolution,
                               sample_rate=tok.audio.sample_rate))
    texts = [d.text for d in docs]
    images = [im for d in docs for im in d.images]
    waves = [w for d in docs for w in d.audio]
    out = {}
    t0 = time.perf_counter()
    for t in texts:
        tok.text.encode(t)
    out["text_docs_per_s"] = round(len(texts) / (time.perf_counter() - t0), 1)
    t0 = time.perf_counter()
    for s in range(0, len(images), 64):
        x = torch.from_numpy(np.stack(images[s: s + 64])).permute(0, 3, 1, 2).float() / 255
        tok.image.encode(x)
    out["images_per_s"] = round(len(images) / (time.perf_counter() - t0), 1)
    seconds = sum(len(w) for w in waves) / tok.audio.sample_rate
    t0 = time.perf_counter()
    for w in waves:
        tok.audio.encode_stream(torch.from_numpy(w)[None])
    out["speech_seconds_per_s"] = round(seconds / (time.perf_counter() - t0), 1)
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    t0 = time.perf_counter()
    for s in range(0, len(order), 8):
        group = order[s: s + 8]
        n = math.ceil(max(len(waves[i]) for i in group) / tok.audio.hop) * tok.audio.hop
        x = torch.zeros(len(group), n)
        for r, i in enumerate(group):
            x[r, : len(waves[i])] = torch.from_numpy(waves[i])
        tok.audio.encode_stream(x)
    out["speech_seconds_per_s_batched_8"] = round(seconds / (time.perf_counter() - t0), 1)
    t0 = time.perf_counter()
    tok.audio.encode_clips(waves, tok.audio.stream_levels)
    out["speech_seconds_per_s_encode_clips"] = round(seconds / (time.perf_counter() - t0), 1)
    out["speech_clips"] = len(waves)
    return out


_PREPARE_ONE = """
import glob, json, sys, time
from anymodal.data.prepare import prepare
t0 = time.perf_counter()
stats = prepare(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
seconds = time.perf_counter() - t0
work = sum(json.load(open(f))["seconds"] for f in glob.glob(sys.argv[3] + "/shards/*.json"))
print(json.dumps({"docs": stats["docs"], "tokens": stats["tokens"], "seconds": seconds, "shard_seconds": work}))
"""

_MAKE_TOKENIZERS = """
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from prepare_throughput import demo_shaped_tokenizers
demo_shaped_tokenizers(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def run_under(code_root: Path, code: str, *args: str) -> str:
    """Python `code` run by the anymodal package under `code_root` in a fresh interpreter (its
    folder first on sys.path, ahead of the installed package); returns stdout."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code, *args], cwd=code_root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(code_root)})
    if r.returncode:
        raise SystemExit(f"run under {code_root} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def versus_baseline(rev: str, tmp: Path, docs: int, reps: int, toks_arg: str | None, world_arg: str | None) -> dict:
    """The demo mix through revision `rev`'s prepare and the working tree's, alternately; on
    `world_arg`'s train shards when given (a `make demo` world), else on a new world of `docs`."""
    import shutil
    import statistics
    import subprocess

    from anymodal.data.world import generate_world

    here = Path(__file__).resolve().parents[1]
    base = tmp / "baseline_code"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(here), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    world = Path(world_arg) if world_arg else tmp / "mix_world"
    if not world_arg:
        generate_world(world, "train", docs=docs, seed=2, shard_size=max(1, docs // 8), progress=False)
    toks = Path(toks_arg) if toks_arg else tmp / "mix_toks"
    if not toks_arg:  # made by the older code, so that both can read them (newer code reads older configs)
        run_under(base, _MAKE_TOKENIZERS, str(toks), str(world))
    shards = str(world / "train-*.tar")
    rates: dict[str, list[float]] = {"baseline": [], "current": []}
    work: dict[str, list[float]] = {"baseline": [], "current": []}  # the workers' seconds per document
    for _ in range(reps):
        for name, root in (("baseline", base), ("current", here)):
            out = tmp / f"mix_{name}"
            shutil.rmtree(out, ignore_errors=True)
            r = json.loads(run_under(root, _PREPARE_ONE, str(toks), shards, str(out)).strip().splitlines()[-1])
            rates[name].append(r["docs"] / r["seconds"])
            work[name].append(r["shard_seconds"] / r["docs"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_work = {k: statistics.median(v) for k, v in work.items()}
    return {"rev": rev, "docs": r["docs"], "world": str(world_arg or "new"), "reps": reps,
            "baseline_docs_per_s": [round(v, 1) for v in rates["baseline"]],
            "current_docs_per_s": [round(v, 1) for v in rates["current"]],
            "speedup_median": round(med["current"] / med["baseline"], 3),
            # start-up (imports, worker processes) left out: what a long prepare runs at
            "baseline_worker_ms_per_doc": [round(1e3 * v, 2) for v in work["baseline"]],
            "current_worker_ms_per_doc": [round(1e3 * v, 2) for v in work["current"]],
            "work_speedup_median": round(med_work["baseline"] / med_work["current"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--kind-docs", type=int, default=60, help="documents of each kind for by_kind (0: skip)")
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--baseline", default=None, help="git revision to compare the demo mix's docs/s against")
    ap.add_argument("--baseline-docs", type=int, default=2000)
    ap.add_argument("--baseline-world", default=None,
                    help="compare on this world's train-*.tar (e.g. runs/demo/world, with --tokenizers runs/demo/tokenizers)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only-baseline", action="store_true", help="skip everything but the comparison")
    args = ap.parse_args()
    from anymodal.data.prepare import prepare
    from anymodal.data.world import generate_world

    if args.only_baseline and not args.baseline:
        ap.error("--only-baseline needs --baseline REV")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vs = {"vs_baseline": versus_baseline(args.baseline, tmp, args.baseline_docs, args.reps, args.tokenizers,
                                             args.baseline_world)} if args.baseline else {}
        if args.only_baseline:
            print(json.dumps(vs, indent=1))
            return
        generate_world(tmp / "world", "train", docs=args.docs, seed=0, shard_size=args.shard_size, progress=False)
        toks = Path(args.tokenizers) if args.tokenizers else demo_shaped_tokenizers(tmp / "toks", tmp / "world")
        results = {}
        cores = os.cpu_count() or 1
        for workers in sorted({1, cores}):
            t0 = time.perf_counter()
            stats = prepare(toks, str(tmp / "world" / "train-*.tar"), tmp / f"tokens{workers}", workers=workers,
                            progress=False)
            dt = time.perf_counter() - t0
            results[f"workers_{workers}"] = {"docs_per_s": round(stats["docs"] / dt, 2), "seconds": round(dt, 2),
                                            "tokens_per_s": round(stats["tokens"] / dt, 1)}
        by_kind = {}
        for kind in KINDS if args.kind_docs else ():
            only = [f"kinds.{k}={1 if k == kind else 0}" for k in KINDS]
            generate_world(tmp / kind, "train", docs=args.kind_docs, seed=1, overrides=only, progress=False)
            t0 = time.perf_counter()
            k_stats = prepare(toks, str(tmp / kind / "train-*.tar"), tmp / f"tokens_{kind}", workers=1, progress=False)
            by_kind[kind] = round(k_stats["docs"] / (time.perf_counter() - t0), 1)
        print(json.dumps({"docs": stats["docs"], "tokens": stats["tokens"],
                          "tokens_by_modality": stats["tokens_by_modality"], "shards": stats["shards"],
                          "docs_by_kind": stats["docs_by_kind"], **results, "by_kind_docs_per_s": by_kind,
                          "encode": encode_rates(toks, tmp / "world"), **vs}, indent=1))


if __name__ == "__main__":
    main()

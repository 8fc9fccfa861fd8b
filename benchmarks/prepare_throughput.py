"""Throughput of `anymodal prepare` (raw demo-world shards -> token shards), documents per second,
with one worker process and with one per core; prints JSON.

The tokenizers have the demo recipes' shapes (text BPE 1200 pieces, the image and audio codecs of
configs/tokenizer/*_demo.yaml, or the default configs when a recipe is missing) with untrained
weights: encoding costs the same as with trained ones. Pass `--tokenizers DIR` to use a real set.

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/prepare_throughput.py [--docs 300]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--tokenizers", default=None)
    args = ap.parse_args()
    from anymodal.data.prepare import prepare
    from anymodal.data.world import generate_world

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
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
        print(json.dumps({"docs": stats["docs"], "tokens": stats["tokens"],
                          "tokens_by_modality": stats["tokens_by_modality"], "shards": stats["shards"],
                          "docs_by_kind": stats["docs_by_kind"], **results}, indent=1))


if __name__ == "__main__":
    main()

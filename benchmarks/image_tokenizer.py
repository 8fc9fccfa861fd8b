"""Benchmark the image tokenizer: train (optional), then measure quality and speed; prints JSON.

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/image_tokenizer.py --train \
        --config tokenizer/image_demo.yaml --out /tmp/bench-image
    .venv/bin/python benchmarks/image_tokenizer.py --tokenizer /tmp/bench-image   # measure only

Quality on the demo world's val split (images the tokenizer never trained on): PSNR (dB, of the
8-bit reconstruction), SSIM, codebook usage and perplexity over all val tokens, and the docs/world.md
image check's agreement (same (colour, shape) objects found in reconstruction and original).
Speed: encode+decode images/s on this machine's CPU (median of repeats, batch 64), reported
separately for encode and decode too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from anymodal.tokenizers.image import ImageTokenizer, load_image_config
from anymodal.train.image_tokenizer import _load_images, evaluate, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tokenizer/image_demo.yaml")
    ap.add_argument("--out", default="/tmp/anymodal-bench-image")
    ap.add_argument("--train", action="store_true", help="train first (into --out), timing it")
    ap.add_argument("--tokenizer", help="measure an existing tokenizer dir instead of --out")
    ap.add_argument("--val-shards", help="val shards (default: OUT/world/val/*.tar written by training)")
    ap.add_argument("--max-val", type=int, default=0, help="cap on val images (0 = all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="config overrides for --train")
    a = ap.parse_args()

    report: dict = {"config": a.config, "threads": torch.get_num_threads()}
    out = Path(a.out)
    if a.train:
        cfg = load_image_config(a.config, a.overrides)
        t0 = time.time()
        res = train(cfg, out, progress=sys.stderr.isatty())
        report["train"] = {"wall_s": round(time.time() - t0, 1), "steps": res["steps"],
                           "train_loop_s": round(res["seconds"], 1), "records": res["records"]}
    tok_dir = Path(a.tokenizer) if a.tokenizer else out
    tok = ImageTokenizer.load(tok_dir)
    val = a.val_shards or str(tok_dir / "world" / "val" / "*.tar")
    images = _load_images(val, tok.cfg, a.max_val, None)  # [N, R, R, 3] uint8
    metrics, _ = evaluate(tok, images, batch=a.batch, image_check=True)
    report["quality"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}

    x = images[: a.batch].permute(0, 3, 1, 2).float() / 255  # [b, 3, R, R]
    enc, dec = [], []
    tok.encode(x)  # warm-up
    for _ in range(a.repeats):
        t = time.perf_counter()
        ids = tok.encode(x)
        t1 = time.perf_counter()
        tok.decode(ids)
        t2 = time.perf_counter()
        enc.append(t1 - t)
        dec.append(t2 - t1)
    n = len(x)
    report["speed_cpu"] = {
        "batch": n,
        "encode_images_per_s": round(n / statistics.median(enc), 1),
        "decode_images_per_s": round(n / statistics.median(dec), 1),
        "encode_decode_images_per_s": round(n / statistics.median([e + d for e, d in zip(enc, dec)]), 1),
    }
    report["tokens_per_image"] = tok.grid_shape[0] * tok.grid_shape[1]
    report["codebook_size"] = tok.codebook_size
    report["params_M"] = round(sum(p.numel() for p in tok.parameters()) / 1e6, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

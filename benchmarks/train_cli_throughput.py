"""End-to-end training throughput of `anymodal train` (DeepSpeed engine, packing loader, logging);
prints JSON with median tokens/s, step time and MFU over the steps after warm-up.

The corpus is synthetic (random ids of demo-world document lengths in a demo-sized vocabulary):
throughput depends on the model, seq_len and batch, not on what the ids mean. Pass `--tokens DIR`
to use real token shards instead.

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/train_cli_throughput.py [--steps 25] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOC_LENGTHS = (40, 110, 250, 500)  # tokens: captions, t2i/i2t, speech, stories (the demo world's kinds)


def synthetic_tokens(out: Path, vocab: int = 4608, docs: int = 3000, seed: int = 0) -> Path:
    from anymodal.data.prepare import write_token_dataset
    from anymodal.sample.bundle import tiny_bundle

    space = tiny_bundle().tok.space
    # the demo's layout: 1200 text ids, 1024 image codes, 4 x 512 audio codes, padded to `vocab`
    # (random ids: the square layout, version 1, keeps the table free of image structure tokens)
    space = dataclasses.replace(space, image_offset=1200, image_codebook_size=1024, image_grid=(8, 8),
                                audio_offset=2224, audio_n_q=4, audio_codebook_size=512, vocab_size=vocab,
                                version=1, eor=-1, image_size_offset=0, image_max_side=0)
    rng = np.random.default_rng(seed)

    def gen():
        for _ in range(docs):
            n = int(rng.choice(DOC_LENGTHS))
            ids = rng.integers(0, 4272, size=n)
            ids[0], ids[-1] = space.bos, space.eos
            yield ids, space.modality_of(ids), "prose"

    write_token_dataset(out, space, gen())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the medians")
    ap.add_argument("--config", default="train/demo")
    ap.add_argument("--tokens", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = Path(args.tokens) if args.tokens else synthetic_tokens(tmp / "tokens")
        run = tmp / "run"
        cmd = [sys.executable, "-m", "anymodal.cli", "train", "--config", args.config, f"data={tokens}",
               f"run_dir={run}", f"steps={args.steps}", "checkpoint_every=1000000", "progress=false",
               *args.overrides]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.time() - t0
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "tokens_per_s" in r]  # the step records (not the data-mix record)
        model = (run / "model.yaml").read_text()
        cfg = (run / "config.yaml").read_text()
    body = recs[args.warmup_steps:]
    import yaml

    c = yaml.safe_load(cfg)
    out = {
        "command": "anymodal train --config " + args.config + " " + " ".join(args.overrides),
        "steps_measured": len(body),
        "tokens_per_step": c["micro_batch"] * c["grad_accum"] * c["seq_len"],
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in body),
        "step_time_median_s": statistics.median(r["step_time"] for r in body),
        "mfu_median": statistics.median(r["mfu"] for r in body) if body[0]["mfu"] is not None else None,
        "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
        "wall_s_including_startup": round(wall, 1),
        "model": {k: v for k, v in yaml.safe_load(model).items() if k in ("dim", "n_layers", "n_heads", "vocab_size")},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

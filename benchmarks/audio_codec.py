"""Audio codec figures on held-out speech; prints one JSON object.

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/audio_codec.py --tokenizer runs/audio_demo
    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/audio_codec.py --train \
        --config tokenizer/audio_demo.yaml --out /tmp/aud-exp1 [--set loss.stft_weight=0.25 ...]

With --train the codec is first trained with --config (+ --set overrides) into --out (as
`anymodal tokenizer train audio` does), then measured; the JSON adds the training steps and minutes.

Speech: the demo world's val split (generated into --work on first use; espeak-ng captions with a
different seed when the world generator is not available) or any raw shards given with --val.
Reports STOI, mel distance, SI-SNR, codebook usage per level, tokens per second, the same
figures with fewer quantizer levels, and the CPU real-time factor of encode + decode (median of
--reps passes over all clips; < 1 means faster than real time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anymodal.config import load_config  # noqa: E402
from anymodal.tokenizers.audio import AudioTokenizer  # noqa: E402
from anymodal.tokenizers.audio_metrics import evaluate_codec  # noqa: E402
from anymodal.train.audio_tokenizer import AudioTrainConfig, get_clips  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="", help="audio tokenizer dir (config.yaml + model.safetensors)")
    ap.add_argument("--train", action="store_true", help="train a codec with --config into --out first")
    ap.add_argument("--config", default="tokenizer/audio_demo.yaml", help="training config (with --train)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (with --train)")
    ap.add_argument("--out", default="", help="training output dir (with --train; must not hold a run)")
    ap.add_argument("--val", default="", help="raw shards with speech (default: demo world val split)")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--work", default="/tmp/anymodal-audio-bench", help="where the demo world val split is cached")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    trained = {}
    if args.train:
        if not args.out:
            ap.error("--train needs --out")
        from anymodal.train.audio_tokenizer import train

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the final JSON
            trainer = train(load_config(AudioTrainConfig, args.config, args.set), args.out, progress=False)
        trained = {"config": args.config, "overrides": args.set, "train_steps": trainer.step,
                   "train_minutes": round(trainer.elapsed() / 60, 2), "train_wall_minutes": round((time.perf_counter() - t0) / 60, 2)}
        args.tokenizer = args.out
    elif not args.tokenizer:
        ap.error("give --tokenizer DIR, or --train --out DIR")

    tok = AudioTokenizer.load(args.tokenizer)
    cfg = load_config(
        AudioTrainConfig,
        data={"model": {"sample_rate": tok.sample_rate, "strides": list(tok.cfg.strides)},
              "data": {"val": args.val, "val_clips": args.clips, "world_docs": max(args.clips * 3, 100)}},
    )
    clips = get_clips(cfg, Path(args.work), "val")[: args.clips]

    result = {"tokenizer": args.tokenizer, "device": "cpu", "threads": torch.get_num_threads(), **trained}
    result.update(evaluate_codec(tok, clips, with_stoi=True))
    result["frame_rate"] = tok.frame_rate
    result["n_q"] = tok.n_q
    result["codebook_size"] = tok.codebook_size
    result["bits_per_second"] = tok.frame_rate * tok.n_q * float(np.log2(tok.codebook_size))
    result["by_levels"] = {
        str(k): {key: round(v, 4) for key, v in evaluate_codec(tok, clips, levels=k).items()
                 if key in ("stoi", "mel_distance", "si_snr_db")}
        for k in range(1, tok.n_q)
    }

    # real-time factor: encode + decode of every clip, one at a time (as `sample` and `prepare` do)
    seconds = sum(c.size for c in clips) / tok.sample_rate
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for c in clips:
            tok.decode(tok.encode(torch.from_numpy(c)[None]))
        times.append(time.perf_counter() - t0)
    result["rtf_encode_decode_cpu"] = statistics.median(times) / seconds
    params = sum(p.numel() for p in tok.parameters())
    result["params_m"] = round(params / 1e6, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Audio codec figures on held-out speech; prints one JSON object.

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/audio_codec.py --tokenizer runs/audio_demo

Speech: the demo world's val split (generated into --work on first use; espeak-ng captions with a
different seed when the world generator is not available) or any raw shards given with --val.
Reports STOI, mel distance, SI-SNR, codebook usage per level, tokens per second, the same
figures with fewer quantizer levels, and the CPU real-time factor of encode + decode (median of
--reps passes over all clips; < 1 means faster than real time).
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--tokenizer", required=True, help="audio tokenizer dir (config.yaml + model.safetensors)")
    ap.add_argument("--val", default="", help="raw shards with speech (default: demo world val split)")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--work", default="/tmp/anymodal-audio-bench", help="where the demo world val split is cached")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = AudioTokenizer.load(args.tokenizer)
    cfg = load_config(
        AudioTrainConfig,
        data={"model": {"sample_rate": tok.sample_rate, "strides": list(tok.cfg.strides)},
              "data": {"val": args.val, "val_clips": args.clips, "world_docs": max(args.clips * 3, 100)}},
    )
    clips = get_clips(cfg, Path(args.work), "val")[: args.clips]

    result = {"tokenizer": args.tokenizer, "device": "cpu", "threads": torch.get_num_threads()}
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

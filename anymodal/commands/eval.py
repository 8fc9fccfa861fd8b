"""`anymodal eval --model BUNDLE --data SHARDS --out metrics.json [--limit N]`.

Every WORLD.md metric (t2i / a2i image checks, caption, grounding Acc@0.5 and mIoU, refer, ASR
WER, TTS round trip, bits per token per modality), overall and on the unseen-combination subset.
"""

from __future__ import annotations

import argparse

from .bundle_args import add_runtime_arguments, open_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle directory")
    parser.add_argument("--data", required=True, help="validation shards (path, glob or {a..b} pattern)")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--limit", type=int, default=None, help="documents per kind (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale for generated images/audio")
    parser.add_argument("--max-text-tokens", type=int, default=160, help="cap on generated captions/transcripts")
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..eval.run import EvalOptions, evaluate

    bundle = open_bundle(args)
    opts = EvalOptions(limit=args.limit, batch_size=args.batch_size, seed=args.seed, cfg=args.cfg,
                       max_text_tokens=args.max_text_tokens)
    evaluate(bundle, args.data, out=args.out, opts=opts)
    print(f"wrote {args.out}")
    return 0

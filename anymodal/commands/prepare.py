"""`anymodal prepare --tokenizers DIR --input RAW --out TOK`: raw shards -> token shards (done once)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizers", required=True, help="tokenizer set (text/, image/, audio/, token_space.json)")
    parser.add_argument("--input", required=True, nargs="+",
                        help="raw webdataset shards: paths, a folder, a glob or a brace pattern")
    parser.add_argument("--out", required=True, help="token-shard folder to write (resumes per shard)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--image-mode", choices=("resize", "letterbox"), default=None,
                        help="how images are fitted to the image tokenizer's square resolution "
                             "(default: the image tokenizer's own model.image_mode)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--device", default="auto", help="where the image/audio tokenizers run: auto (CUDA when "
                        "present), cpu, cuda")
    parser.add_argument("--batch-docs", type=int, default=64, help="documents tokenized per batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare

    stats = prepare(args.tokenizers, args.input if len(args.input) > 1 else args.input[0], args.out,
                    workers=args.workers, strict=args.strict, image_mode=args.image_mode,
                    batch_docs=args.batch_docs, progress=not args.no_progress, threads=args.threads, device=args.device)
    summary = {k: stats[k] for k in ("docs", "tokens", "tokens_by_modality", "bad", "docs_per_second")}
    print(json.dumps(summary))
    return 0

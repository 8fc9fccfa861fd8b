"""`anymodal world`: write the embedded demo world as raw webdataset shards (docs/world.md)."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for {split}-NNNNN.tar shards")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--docs", type=int, default=2000, help="number of documents (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="world/demo.yaml", help="world config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="world config overrides")
    parser.add_argument("--shard-size", type=int, default=None, help="documents per shard")
    parser.add_argument("--require-audio", action="store_true",
                        help="fail (exit 2) when espeak-ng is missing instead of skipping audio")
    parser.add_argument("--no-audio", action="store_true", help="write no audio documents")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from ..data.world import generate_world  # loads torch: only once the command runs

    if args.require_audio and args.no_audio:
        raise UserError("--require-audio and --no-audio contradict each other")
    summary = generate_world(args.out, split=args.split, docs=args.docs, seed=args.seed, config=args.config,
                             overrides=args.overrides, require_audio=args.require_audio,
                             shard_size=args.shard_size, progress=not args.quiet,
                             audio=False if args.no_audio else None)
    if not args.quiet:
        brief = {k: summary[k] for k in ("split", "docs", "audio", "counts", "unseen_docs")}
        brief["shards"] = len(summary["shards"])
        brief["docs_per_minute"] = round(summary["docs"] / max(summary["seconds"], 1e-9) * 60)
        print(json.dumps(brief))
    return 0

"""`anymodal export --run DIR --out BUNDLE`: consolidate a run's newest checkpoint into a model bundle."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run directory")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--tokenizers", default=None,
                        help="tokenizer set to copy in (default: the one the run's data was prepared with)")
    parser.add_argument("--step", type=int, default=None, help="export this checkpoint step instead of the newest")


def run(args: argparse.Namespace) -> int:
    from ..train.export import export

    export(args.run, args.out, tokenizers=args.tokenizers, step=args.step)
    return 0

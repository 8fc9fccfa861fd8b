"""`anymodal export`: a run's newest checkpoint -> a model bundle (default), or a run or bundle ->
a Hugging Face Chameleon folder (`--format hf`, see anymodal/hf/export.py)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="training run directory")
    parser.add_argument("--bundle", default=None, help="a model bundle to convert (--format hf only)")
    parser.add_argument("--out", required=True, help="bundle or Hugging Face folder to write")
    parser.add_argument("--format", choices=("bundle", "hf"), default="bundle",
                        help="bundle: anymodal's own layout; hf: transformers' Chameleon format")
    parser.add_argument("--tokenizers", default=None,
                        help="tokenizer set to copy in (default: the one the run's data was prepared with)")
    parser.add_argument("--step", type=int, default=None, help="export this checkpoint step instead of the newest")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="--format hf: split the weights into files of at most this size (e.g. 2GB, 500MB)")


def run(args: argparse.Namespace) -> int:
    from ..train.export import export  # loads torch: only once the command runs

    if (args.run is None) == (args.bundle is None):
        raise UserError("give exactly one of --run RUN or --bundle DIR")
    if args.format == "bundle":
        if args.bundle is not None:
            raise UserError("--bundle is already a bundle: use --format hf to convert it")
        export(args.run, args.out, tokenizers=args.tokenizers, step=args.step)
        return 0
    from ..hf.export import export_hf  # needs the anymodal[hf] extra

    if args.bundle is not None:
        export_hf(args.bundle, args.out, args.max_shard_size)
        return 0
    parent = Path(args.out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="anymodal-export-", dir=parent) as tmp:
        bundle = export(args.run, Path(tmp) / "bundle", tokenizers=args.tokenizers, step=args.step)
        export_hf(bundle, args.out, args.max_shard_size)
    return 0

"""`anymodal train --config YAML [key=value ...] [--resume]`: pretrain on token shards (DeepSpeed).

One process: `anymodal train ...`; several: `deepspeed --no_local_rank --module anymodal.cli train ...`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="train/demo", help="train YAML (path or name under configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    # the deepspeed launcher adds --local_rank unless given --no_local_rank; LOCAL_RANK is in the env anyway
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from ..train.lm import load_train_config, train  # loads torch: only once the command runs

    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result.interrupted:
        return 130 if result.interrupted == "SIGINT" else 143
    return 0

"""`anymodal demo [--out DIR] [--config YAML] [key=value …]`: the whole pipeline on the demo world."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (resumes if it exists)")
    parser.add_argument("--config", default="demo", help="demo recipe (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo  # loads torch: only once the command runs

    run_demo(args.out, args.config, args.overrides)
    return 0

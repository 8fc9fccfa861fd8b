"""Arguments and loading shared by the commands that run a model bundle (sample, ground, eval).

Kept free of torch imports so that building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", default="auto", help="CPU threads (auto: 1 per ~25M parameters)")


def open_bundle(args: argparse.Namespace):
    """The bundle of `args.model` on `args.device`, with `args.threads` CPU threads."""
    from ..sample.bundle import load_bundle, set_threads  # loads torch: only once the command runs

    bundle = load_bundle(args.model, device=args.device)
    set_threads(bundle, args.threads)
    return bundle

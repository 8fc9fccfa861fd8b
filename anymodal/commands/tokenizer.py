"""`anymodal tokenizer train|encode|decode KIND ...`.

Dispatches by kind: training lives in `anymodal.train.<kind>_tokenizer.train_from_cli`, and
file encode/decode in `anymodal.tokenizers.<kind>.encode_file / decode_file`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from ..errors import UserError

KINDS = ("text", "image", "audio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a tokenizer from a config")
    t.add_argument("kind", choices=KINDS)
    t.add_argument("--config", required=True, help="YAML recipe (path or name under configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument("--out", required=True, help="tokenizer directory to write")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    for action, what in (("encode", "media file -> ids JSON"), ("decode", "ids JSON -> media file")):
        p = sub.add_parser(action, help=what)
        p.add_argument("kind", choices=KINDS)
        p.add_argument("--tokenizer", required=True, help="tokenizer directory")
        p.add_argument("input")
        p.add_argument("output")


def _module(name: str):
    if importlib.util.find_spec(name) is None:
        raise UserError(f"{name} is not built yet")
    return importlib.import_module(name)


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        mod = _module(f"anymodal.train.{args.kind}_tokenizer")
        mod.train_from_cli(config=args.config, overrides=args.overrides, out=args.out, resume=args.resume)
        return 0
    mod = _module(f"anymodal.tokenizers.{args.kind}")
    fn = mod.encode_file if args.action == "encode" else mod.decode_file
    fn(args.tokenizer, args.input, args.output)
    return 0

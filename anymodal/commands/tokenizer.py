"""`anymodal tokenizer train|encode|decode KIND ...`.

Dispatches by kind: training lives in `anymodal.train.<kind>_tokenizer.train_from_cli`, and
file encode/decode in `anymodal.tokenizers.<kind>.encode_file / decode_file`. `encode image
--max-tokens N` keeps the image's aspect on a grid of at most N codes (what the tokenizer's native
mode does with its own budget); `decode image` writes the grid the JSON holds.
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
        if action == "encode":
            p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                           help="image: keep the input's aspect on the nearest grid of at most N codes "
                                "(default: the tokenizer's image_mode, and its budget when that is native)")


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
    if args.action == "decode":
        mod.decode_file(args.tokenizer, args.input, args.output)
        return 0
    if args.max_tokens is None:
        mod.encode_file(args.tokenizer, args.input, args.output)
    elif args.kind != "image":
        raise UserError("--max-tokens is for images")
    else:
        mod.encode_file(args.tokenizer, args.input, args.output, max_tokens=args.max_tokens)
    return 0

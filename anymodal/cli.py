"""The `anymodal` command.

Each subcommand lives in `anymodal/commands/<name>.py` with `add_arguments(parser)` and
`run(args)`. Command modules are imported only when their subcommand runs (torch is slow to
import), except for their argument definitions, which are cheap. A `UserError` anywhere becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from . import __version__
from .errors import UserError

# (name, help) in the order of the pipeline.
COMMANDS: list[tuple[str, str]] = [
    ("world", "write the embedded demo world as raw webdataset shards"),
    ("tokenizer", "train a text/image/audio tokenizer, or encode/decode media with one"),
    ("prepare", "run the frozen tokenizers over raw shards and write token shards"),
    ("train", "pretrain the transformer on token shards (DeepSpeed; resumable)"),
    ("export", "turn a run directory into a model bundle, or either into a Hugging Face folder"),
    ("sample", "generate mixed text, images and audio from a prompt"),
    ("ground", "find the box of a phrase in an image"),
    ("eval", "measure a model bundle on a validation split (docs/world.md metrics)"),
    ("demo", "run the whole pipeline on the demo world"),
]


def _command_module(name: str):
    modname = f"anymodal.commands.{name}"
    if importlib.util.find_spec(modname) is None:
        return None
    return importlib.import_module(modname)


class _Parser(argparse.ArgumentParser):
    """Argument mistakes are one line on stderr and exit 2, like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"anymodal: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="anymodal",
        description="Train and sample a unified early-fusion any-to-any model from scratch.",
    )
    parser.add_argument("--version", action="version", version=_version())
    # The `deepspeed` launcher puts --local_rank=N before the subcommand; LOCAL_RANK is read from env.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = _command_module(name)
        if module is None:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_module=None)
        else:
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def _version() -> str:
    return f"anymodal {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may come after options (argparse would only take them before).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    if args._module is None:
        print(f"anymodal: error: '{args.command}' is not built yet", file=sys.stderr)
        return 2
    try:
        rc = args._module.run(args)
    except UserError as e:
        print(f"anymodal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anymodal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

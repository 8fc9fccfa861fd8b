"""`anymodal ground --model BUNDLE --image P --query TEXT [--out P]`: prints the box as JSON.

`{"box": [x1, y1, x2, y2], "score": s}` in pixels of the input image; score is the mean probability
of the four chosen location tokens. With --out, writes the image with the box drawn.
"""

from __future__ import annotations

import argparse

from .bundle_args import add_runtime_arguments, open_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle directory")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--query", required=True, help='the phrase to find, e.g. "the red circle"')
    parser.add_argument("--out", default=None, help="write the image with the box drawn here")
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..sample.ground import format_result, ground_image  # loads torch: only once the command runs

    bundle = open_bundle(args)
    print(format_result(ground_image(bundle, args.image, args.query, out=args.out)))
    return 0

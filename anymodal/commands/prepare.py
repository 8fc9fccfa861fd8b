"""`anymodal prepare --tokenizers DIR --input RAW --out TOK`: raw shards -> token shards (done once).

`--part i --parts N` tokenizes one share of the input (one machine of N); `--merge OUT [--from DIR …]`
writes the manifest once every part is done (docs/scaling.md shows a Slurm array)."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizers", default=None, help="tokenizer set (text/, image/, audio/, token_space.json)")
    parser.add_argument("--input", nargs="+", default=None,
                        help="raw webdataset shards: paths, a folder, a glob, a brace pattern, http(s):// or "
                             "gs:// URLs, or pipe: commands (e.g. 'pipe:aws s3 cp s3://bucket/x.tar -')")
    parser.add_argument("--out", default=None, help="token-shard folder to write (resumes per shard)")
    parser.add_argument("--part", type=int, default=None, help="tokenize only this part (0-based) of --parts")
    parser.add_argument("--parts", type=int, default=1, help="how many parts the input is split into")
    parser.add_argument("--merge", default=None, metavar="OUT",
                        help="write OUT's manifest once all parts are done (no tokenizing)")
    parser.add_argument("--from", dest="part_dirs", nargs="+", default=(), metavar="DIR",
                        help="with --merge: folders the parts wrote to instead of OUT (their shards move into OUT)")
    parser.add_argument("--cache-dir", default=None, help="download remote shards here once and read them from here")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--image-mode", choices=("resize", "letterbox", "native"), default=None,
                        help="how images are fitted: resize or letterbox to the image tokenizer's square "
                             "resolution, or native (each image's own aspect, on the nearest grid within "
                             "--max-image-tokens codes); default: the image tokenizer's own model.image_mode")
    parser.add_argument("--max-image-tokens", type=int, default=None, metavar="N",
                        help="native mode: at most N codes per image (default: the image tokenizer's "
                             "model.max_tokens; given alone, it selects native)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--device", default="auto", help="where the image/audio tokenizers run: auto (CUDA when "
                        "present), cpu, cuda")
    parser.add_argument("--batch-docs", type=int, default=64, help="documents tokenized per batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import merge, prepare  # loads torch: only once the command runs

    if args.merge is not None:
        if args.input or args.out or args.tokenizers:
            raise UserError("--merge OUT takes no --tokenizers, --input or --out")
        stats = merge(args.merge, args.part_dirs)
    else:
        if not (args.tokenizers and args.input and args.out):
            raise UserError("prepare needs --tokenizers, --input and --out (or --merge OUT)")
        if args.part_dirs:
            raise UserError("--from goes with --merge")
        stats = prepare(args.tokenizers, args.input if len(args.input) > 1 else args.input[0], args.out,
                        workers=args.workers, strict=args.strict, image_mode=args.image_mode,
                        max_image_tokens=args.max_image_tokens,
                        batch_docs=args.batch_docs, progress=not args.no_progress, threads=args.threads,
                        device=args.device, part=args.part, parts=args.parts, cache_dir=args.cache_dir)
    if not stats.get("complete", True):
        print(json.dumps({k: stats[k] for k in ("complete", "shards", "shards_done", "docs", "tokens")}))
        return 0
    summary = {k: stats[k] for k in ("docs", "tokens", "tokens_by_modality", "bad", "docs_per_second",
                                     "image_mode", "max_image_tokens") if k in stats}
    print(json.dumps({"complete": True, **summary}))
    return 0

"""`anymodal eval --model BUNDLE --data SHARDS --out metrics.json [--limit N]`.

Every docs/world.md metric (t2i / a2i image checks, caption, grounding Acc@0.5 and mIoU, refer, ASR
WER, TTS round trip, bits per token per modality), overall and on the unseen-combination subset,
and the accuracies per number of objects in the scene (`by_objects`).
"""

from __future__ import annotations

import argparse

from ..errors import UserError
from .bundle_args import add_runtime_arguments, open_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle directory")
    parser.add_argument("--data", required=True, help="validation shards (path, glob or {a..b} pattern)")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--limit", type=int, default=None, help="documents per kind (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", default=None,
                        help="guidance scale of generated images and audio: one number or image=S,audio=S "
                             "(default image=1.5,audio=3; 1 = off)")
    parser.add_argument("--max-text-tokens", type=int, default=160, help="cap on generated captions/transcripts")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated generation tasks to run (default: t2i,a2i,i2t,ground,refer,asr,tts)")
    parser.add_argument("--temperature", default=None,
                        help="sampling temperature of images and audio: one number or image=T,audio=T "
                             "(text and boxes stay greedy; default 1)")
    parser.add_argument("--top-k", default=None, help="top-k of images and audio (default 100), same forms")
    parser.add_argument("--examples", default=None,
                        help="also write every generated answer as JSON lines here (task, document, right or "
                             "not, what the model said or drew)")
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..eval.run import GEN_KINDS, EvalOptions, eval_sampling, evaluate  # loads torch: only now
    from ..sample.sampling import DEFAULT_CFG
    from ..sample.session import per_modality  # loads torch too

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else GEN_KINDS
    sampling = eval_sampling()
    media = ("image", "audio")
    temps = per_modality(args.temperature, "temperature", float, media)
    ks = per_modality(args.top_k, "top-k", int, media)
    for m in set(temps) | set(ks):
        if m not in media:
            raise UserError(f"eval decodes {m} greedily; --temperature/--top-k apply to image and audio only")
        cur = getattr(sampling, m)
        setattr(sampling, m, type(cur)(temps.get(m, cur.temperature), ks.get(m, cur.top_k), cur.top_p))
    cfg = {**DEFAULT_CFG, **per_modality(args.cfg, "cfg", float, media)}
    if set(cfg) - set(media) or min(cfg.values()) <= 0:
        raise UserError(f"--cfg takes a positive scale for image and audio, got {args.cfg!r}")
    bundle = open_bundle(args)
    opts = EvalOptions(limit=args.limit, batch_size=args.batch_size, seed=args.seed, cfg=cfg,
                       max_text_tokens=args.max_text_tokens, tasks=tasks, sampling=sampling,
                       examples=args.examples)
    evaluate(bundle, args.data, out=args.out, opts=opts)
    print(f"wrote {args.out}")
    return 0

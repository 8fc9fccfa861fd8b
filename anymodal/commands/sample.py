"""`anymodal sample --model BUNDLE --prompt TEXT [--image P]… [--audio P]… --out DIR …`.

Generates mixed text, images and audio from a prompt (inline `<image:cat.png>` / `<audio:q.wav>`
references work too) and writes index.html, sample.md, image_*.png, audio_*.wav and tokens.json.
`--image-size WxH` / `--aspect W:H` ask for an image of that size or shape.
"""

from __future__ import annotations

import argparse

from .bundle_args import add_runtime_arguments, open_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle directory (from `anymodal export`)")
    parser.add_argument("--prompt", required=True, help="prompt text; may reference <image:P> and <audio:P>")
    parser.add_argument("--image", action="append", default=[], help="image placed before the prompt text")
    parser.add_argument("--audio", action="append", default=[], help="audio placed before the prompt text")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample (sample i uses seed+i)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance (1 = off; default 3 when the prompt ends in <boa>, else 1.5)")
    parser.add_argument("--temperature", default=None,
                        help="0 = greedy; one number or per modality, e.g. text=0.7,image=1.0,audio=1.0,loc=0")
    parser.add_argument("--top-k", default=None, help="0 = off; one number or per modality (text=0,image=100)")
    parser.add_argument("--top-p", default=None, help="1 = off; one number or per modality")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-audio-seconds", type=float, default=10.0, help="a generated clip ends by then")
    parser.add_argument("--stop-after-span", action="store_true",
                        help="end each sample as soon as its first image, audio clip or box is complete")
    parser.add_argument("--image-size", default=None, metavar="WxH",
                        help="generate an image of this many pixels (snapped to whole codes), e.g. 96x48; "
                             "appended to the prompt (after its <boi> when it ends with one)")
    parser.add_argument("--aspect", default=None, metavar="W:H",
                        help="generate an image of this aspect, e.g. 2:1, within the image tokenizer's "
                             "max_tokens (without --image-size / --aspect the model chooses the size)")
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..sample.session import SampleOptions, run_sample  # loads torch: only once the command runs

    bundle = open_bundle(args)
    opts = SampleOptions(seed=args.seed, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                         max_audio_seconds=args.max_audio_seconds, stop_after_span=args.stop_after_span,
                         image_size=args.image_size, aspect=args.aspect)
    run_sample(bundle, args.prompt, args.out, images=args.image, audios=args.audio, opts=opts)
    print(f"wrote {args.out}/index.html")
    return 0

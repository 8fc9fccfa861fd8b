"""How much an image tokenizer's codes depend on their context, on demo-world scenes; prints JSON.

An LM that draws an image predicts its codes one by one. If the same cell content gets different
codes depending on what else is in the picture, part of every code is noise the LM cannot learn.
For scenes of `--objects` objects this measures:

- `object_cells_same_alone`: share of an object's cells whose code stays the same when the scene's
  other objects are removed (1.0: codes see their own cell only);
- `background_codes` / `background_top_share`: distinct codes of the cells no object touches, and
  the share of the most common one (one code and 1.0 for a white cell that is always one code);
- `codes_per_cell_content`: distinct codes per cell content (object, size and its offset from
  the cell) when objects sit on the code grid (`--snap` = the tokenizer's downsample);
- `held_out`: the cells of objects of the world's held-out colour+shape pairs (`--unseen`), drawn
  alone, against the codes of the scenes of seen pairs above: the share whose code never occurs
  there (`new_codes`), and for (colour, structure) codes the share whose colour part or structure
  part never occurs there (`new_colours`, `new_structures`: 0 means an LM with factored code
  embeddings has trained rows for every part of them).

    .venv/bin/python benchmarks/image_code_context.py --tokenizer runs/demo/tokenizers/image [--snap 8]
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="an image tokenizer directory")
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--canvas", type=int, default=48)
    ap.add_argument("--snap", type=int, default=8, help="box corners on multiples of this (1: anywhere)")
    ap.add_argument("--side-step", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unseen", default="purple triangle,orange square",
                    help="held-out colour+shape pairs, comma-separated (the demo world's by default)")
    args = ap.parse_args()

    import torch

    from anymodal.data import scenes as S
    from anymodal.tokenizers.image import ImageTokenizer

    torch.set_num_threads(2)
    tok = ImageTokenizer.load(args.tokenizer).eval()
    d = tok.downsample
    rng = np.random.default_rng(args.seed)
    held_out = {tuple(p.split()) for p in args.unseen.split(",") if p.strip()}
    seen_pairs = {(c, s) for c in S.COLOURS for s in S.SHAPES} - held_out
    seen_codes: set[int] = set()
    same = total = 0
    background: collections.Counter = collections.Counter()
    by_content: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for _ in range(args.scenes):
        scene = S.sample_scene(rng, args.canvas, n_objects=args.objects, allowed=seen_pairs, snap=args.snap,
                               side_step=args.side_step)
        full = tok.encode_pixels([S.render_scene(scene)])[0]  # [h, w]
        seen_codes.update(int(v) for v in full.flat)
        occupied = np.zeros(full.shape, dtype=bool)
        alone = tok.encode_pixels([S.render_scene(scene.with_objects((o,))) for o in scene.objects])
        for o, codes in zip(scene.objects, alone):
            x1, y1, x2, y2 = o.box
            for r in range(y1 // d, (y2 - 1) // d + 1):
                for c in range(x1 // d, (x2 - 1) // d + 1):
                    occupied[r, c] = True
                    same += int(full[r, c] == codes[r, c])
                    total += 1
                    by_content[(o.colour, o.shape, x2 - x1, c * d - x1, r * d - y1)][int(full[r, c])] += 1
        background.update(int(v) for v in full[~occupied])
    n_bg = sum(background.values())
    new = []  # per held-out object cell: (code new, colour part new, structure part new)
    n_colour = tok.code_factors[0] if len(tok.code_factors) == 2 else 0
    seen_colours, seen_structures = ({c % n_colour for c in seen_codes}, {c // n_colour for c in seen_codes}) \
        if n_colour else (set(), set())
    for _ in range(args.scenes // 3 if held_out else 0):
        pair = sorted(held_out)[int(rng.integers(len(held_out)))]
        scene = S.sample_scene(rng, args.canvas, n_objects=1, must_include=pair, snap=args.snap,
                               side_step=args.side_step)
        codes = tok.encode_pixels([S.render_scene(scene)])[0]
        x1, y1, x2, y2 = scene.objects[0].box
        for r in range(y1 // d, (y2 - 1) // d + 1):
            for c in range(x1 // d, (x2 - 1) // d + 1):
                v = int(codes[r, c])
                new.append((v not in seen_codes, n_colour and v % n_colour not in seen_colours,
                            n_colour and v // n_colour not in seen_structures))
    share = np.mean(new, axis=0) if new else [None] * 3
    print(json.dumps({
        "tokenizer": args.tokenizer, "encoder": tok.cfg.model.encoder, "scenes": args.scenes,
        "objects": args.objects, "snap": args.snap,
        "object_cells_same_alone": round(same / total, 4), "object_cells": total,
        "background_codes": len(background),
        "background_top_share": round(background.most_common(1)[0][1] / n_bg, 4) if n_bg else None,
        "cell_contents": len(by_content),
        "codes_per_cell_content": round(float(np.mean([len(v) for v in by_content.values()])), 2),
        "held_out": {"pairs": sorted(" ".join(p) for p in held_out), "cells": len(new),
                     "new_codes": None if share[0] is None else round(float(share[0]), 4),
                     **({"new_colours": round(float(share[1]), 4), "new_structures": round(float(share[2]), 4)}
                        if n_colour and new else {})},
    }, indent=1))


if __name__ == "__main__":
    main()

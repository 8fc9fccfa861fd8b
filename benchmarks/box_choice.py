"""Does a model choose the box of the object a phrase names? Teacher-forced, on ground documents; prints JSON.

A ground document asks about each object of its scene in turn. The first location token of a
query's box decides which object gets boxed; once it is right, the other three follow almost for
free. The last query of a document can be answered by elimination (box the object not yet asked
about), the earlier ones only by matching the phrase to the picture. So this runs a bundle over
whole val ground documents (the true tokens as context, as in training) and reports, per number of
objects in the scene and per query, the share of first location tokens the model's argmax gets
right: `2obj_q0` near 0.5 and `2obj_q1` near 1 means a model that boxes by elimination.

    .venv/bin/python benchmarks/box_choice.py --model runs/demo/bundle --val 'runs/demo/world/val-*.tar'
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from anymodal.eval.run import EvalOptions, Evaluator
from anymodal.sample.bundle import load_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a model bundle (anymodal export)")
    ap.add_argument("--val", required=True, help="raw val shards holding ground documents")
    ap.add_argument("--limit", type=int, default=600, help="ground documents to read")
    args = ap.parse_args()

    bundle = load_bundle(args.model, device="cpu")
    ev = Evaluator(bundle, EvalOptions(limit=args.limit, bits_docs=0, progress=False, tasks=("ground",)))
    docs, _, _ = ev.read(args.val)
    lo, hi = bundle.space.loc_range()
    right: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for d in docs["ground"]:
        ids, _ = bundle.stream.encode(ev.segments(d), bos=True, eos=True)
        with torch.no_grad():
            pred = bundle.model(torch.tensor(ids, dtype=torch.long)[None])[0].argmax(-1)  # [T]
        locs = [i for i in range(1, len(ids)) if lo <= ids[i] < hi]
        for q, i in enumerate(locs[::4]):  # a box is four location tokens: x1 y1 x2 y2
            r = right[f"{len(d.meta['objects'])}obj_q{q}"]
            r[0] += int(pred[i - 1].item() == ids[i])
            r[1] += 1
    print(json.dumps({k: {"right": round(v[0] / v[1], 3), "n": v[1]} for k, v in sorted(right.items())}))


if __name__ == "__main__":
    main()

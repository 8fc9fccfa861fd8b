"""Where a model's drawing of a held-out colour-shape pair goes wrong, cell by cell; prints JSON.

On one-object t2i documents of the demo world (val, half of them built around a held-out pair),
this runs the model teacher-forced, on the true prompt and the true image codes, and at every
code of the object (each cell that holds ink) asks which structure the model puts first among the
inked codes, and which colour. It reports, per group (the seen pairs together, each held-out pair
on its own) and per cell (`first`: the object's first inked cell in raster order, where the shape
is chosen; `later`: the rest, where it is continued), the share of cells whose structure and whose
colour the model gets right, when it reads:

- `whole`: the prompt and the image as they are;
- `blind`: the image without its codes' colour factor (needs (colour, structure) codes and a
  model that keeps its factors: a `blind_decode` bundle, or `--run` with the training run);
- `prompt_swapped`, `image_swapped`, `both_swapped` (held-out pairs only): the held-out colour
  replaced by a seen colour of that shape (purple by red, orange by blue) in the prompt's words,
  in the image's colour codes, or in both, to tell which of the two pulls the shape.

    .venv/bin/python benchmarks/held_out_cells.py --model runs/demo/bundle [--run runs/demo/run] [--docs 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import torch

from anymodal.data.world import KINDS, generate_world, load_world_config
from anymodal.errors import UserError
from anymodal.eval.run import EvalOptions, Evaluator
from anymodal.sample.bundle import load_bundle
from anymodal.tokenizers.stream import Text
from anymodal.train.export import load_run_model

SWAP = {"purple": "red", "orange": "blue"}  # a seen colour of the held-out pair's shape


def probe_docs(out: Path, docs: int, seed: int) -> str:
    """Val t2i documents of one object, half of them with a held-out pair; returns the shard glob."""
    overrides = [f"kinds.{k}={int(k == 't2i')}" for k in KINDS] + ["max_objects=1", "val_unseen_fraction=0.5"]
    generate_world(out, split="val", docs=docs, seed=seed, overrides=overrides, progress=False, audio=False)
    return str(out / "val-*.tar")


def colour_digits(encoded, offset: int, n_colour: int, n_codes: int) -> tuple[int, dict[str, list[int]]]:
    """(white's colour digit, each ink's colour digits by frequency) from the documents' codes."""
    per_ink: dict[str, Counter] = defaultdict(Counter)
    for doc, _, ids in encoded:
        codes = ids[(ids >= offset) & (ids < offset + n_codes)] - offset
        per_ink[doc.meta["objects"][0]["colour"]].update((codes % n_colour).tolist())
    white = sum(per_ink.values(), Counter()).most_common(1)[0][0]
    return white, {ink: [d for d, _ in c.most_common() if d != white] for ink, c in per_ink.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model bundle (its tokenizers read the documents)")
    ap.add_argument("--run", default=None, help="the bundle's training run: its checkpoint keeps the code factors")
    ap.add_argument("--data", default=None, help="t2i val shards (default: made here, one object each)")
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a teacher-forced pass of a small model: one thread is enough

    bundle = load_bundle(args.model, device="cpu")
    # the run's newest checkpoint keeps the code factors that export folds
    try:
        model = (load_run_model(args.run)[2] if args.run else bundle.model).eval()
    except UserError as e:
        raise SystemExit(str(e)) from None
    factors = bundle.tok.image.code_factors if bundle.tok.image is not None else []
    if len(factors) != 2:
        raise SystemExit("the bundle's image tokenizer has no (colour, structure) codes")
    n_colour, n_structure = factors
    n_codes, offset = n_colour * n_structure, bundle.space.image_offset
    modes = ["whole"] + (["blind"] if model.code_factors is not None else [])
    held_out = {tuple(p.split()) for p in load_world_config().unseen}

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or probe_docs(Path(tmp) / "probe", args.docs, args.seed)
        ev = Evaluator(bundle, EvalOptions(limit=args.docs, tasks=("t2i",), progress=False))
        per_kind, _, _ = ev.read(data)
        encoded = []
        for d in per_kind["t2i"]:
            if len(d.meta["objects"]) == 1:
                segs = ev.segments(d)
                ids, _ = bundle.stream.encode(segs, bos=True, eos=True)
                encoded.append((d, segs, torch.as_tensor(ids, dtype=torch.long)))
    white, inks = colour_digits(encoded, offset, n_colour, n_codes)

    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])  # (group, mode, cell) -> n, structure, colour
    with torch.no_grad():
        for d, segs, ids in encoded:
            obj = d.meta["objects"][0]
            pair = (obj["colour"], obj["shape"])
            group = " ".join(pair) if pair in held_out else "seen"
            doc_modes = modes + (["prompt_swapped", "image_swapped", "both_swapped"] if pair in held_out else [])
            for mode in doc_modes:
                x = ids
                if mode in ("prompt_swapped", "both_swapped"):
                    swapped = [Text(s.text.replace(f" {pair[0]} ", f" {SWAP[pair[0]]} ")) if isinstance(s, Text) else s
                               for s in segs]
                    x = torch.as_tensor(bundle.stream.encode(swapped, bos=True, eos=True)[0], dtype=torch.long)
                    assert len(x) == len(ids), "a colour word must stay one token"
                if mode in ("image_swapped", "both_swapped"):
                    x = x.clone()
                    rel = x - offset
                    is_code = (rel >= 0) & (rel < n_codes)
                    for held in inks[pair[0]][:2]:  # the held-out ink's colour digits -> the seen ink's first
                        sel = is_code & (rel % n_colour == held)
                        x[sel] += inks[SWAP[pair[0]]][0] - held
                inp = x[None, :-1]  # [1, T]
                blind = (torch.cumsum(inp == bundle.space.boi, 1) > 0) if mode == "blind" else None  # the answer image
                logits = model(inp, drop_first_factor=blind)[0]  # [T, V]
                block = logits[:, offset: offset + n_codes].reshape(-1, n_structure, n_colour)  # [T, structure, colour]
                inked = torch.cat([block[:, :, :white], block[:, :, white + 1:]], 2)  # colours but white
                structure = inked.logsumexp(2).argmax(1)  # [T]
                colour = block.logsumexp(1).argmax(1)  # [T]
                target = ids[1:] - offset
                cells = ((target >= 0) & (target < n_codes) & (target % n_colour != white)).nonzero()[:, 0]
                for rank, t in enumerate(cells.tolist()):
                    c = counts[(group, mode, "first" if rank == 0 else "later")]
                    c[0] += 1
                    c[1] += int(structure[t] == target[t] // n_colour)
                    c[2] += int(colour[t] == target[t] % n_colour)

    result: dict = {"documents": len(encoded), "modes": modes, "groups": {}}
    for (group, mode, cell), (n, s, c) in sorted(counts.items()):
        result["groups"].setdefault(group, {}).setdefault(mode, {})[cell] = {
            "cells": n, "structure": round(s / n, 3), "colour": round(c / n, 3)}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

"""Are an image tokenizer's structure codes blind to the ink? Per held-out pair; prints JSON.

With (colour, structure) codes the LM draws a colour-shape pair that training never shows (a
purple triangle) from a seen colour code and seen structure codes, but only if the tokenizer gives
the shape the same structure codes in the held-out ink as in the inks training shows. This renders
one object of each held-out pair at every box of both sizes on the demo's 8 px grid (48 px
canvas), in its held-out ink and in four seen inks, encodes them, and reports per pair:

- `agreement`: the share of the object's cells whose structure code in the held-out ink equals
  the one in red (the cells holding ink; white cells are one code in any case);
- `seen_agreement`: the same share for the seen inks green, blue and yellow against red;
- `hybrid_right`: the share of the red object's structure codes, put with the held-out ink's
  colour codes and decoded, that the world's checker reads as the held-out pair.

    .venv/bin/python benchmarks/structure_invariance.py runs/demo/tokenizers runs/demo21/bundle
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from anymodal.data.checker import analyse_image
from anymodal.data.scenes import Scene, SceneObject, render_scene
from anymodal.data.world import load_world_config
from anymodal.tokenizers.image import ImageTokenizer

WORLD = load_world_config()  # the demo world: its held-out pairs, canvas and code grid
HELD_OUT = [tuple(pair.split()) for pair in WORLD.unseen]
SEEN_INKS = ("red", "green", "blue", "yellow")
CANVAS, GRID = WORLD.image_size, WORLD.snap


def boxes() -> list[tuple[int, int, int, int]]:
    """Every box of the demo world's two sizes (12 and 20 px) with its corner on the 8 px grid."""
    return [(x, y, x + s, y + s) for s in (12, 20) for x in range(0, CANVAS - s + 1, GRID)
            for y in range(0, CANVAS - s + 1, GRID)]


def measure(tok: ImageTokenizer) -> dict:
    if len(tok.code_factors) != 2:
        raise SystemExit("the tokenizer has no (colour, structure) codes (quantizer.colour_levels)")
    n_colour = tok.code_factors[0]
    out, places = {}, boxes()
    for colour, shape in HELD_OUT:
        inks = (*SEEN_INKS, colour)
        objects = [SceneObject(shape, ink, "large", box) for box in places for ink in inks]
        images = [render_scene(Scene(CANVAS, CANVAS, (o,))) for o in objects]
        codes = np.stack(tok.encode_pixels(images)).reshape(len(places), len(inks), -1)  # [box, ink, cells]
        structure, colour_codes = codes // n_colour, codes % n_colour
        ink = np.stack([(images[i * len(inks)] != 255).any(-1).reshape(CANVAS // GRID, GRID, CANVAS // GRID, GRID)
                        .any((1, 3)).reshape(-1) for i in range(len(places))])  # [box, cells]: holds ink
        agree = float((structure[:, -1] == structure[:, 0])[ink].mean())
        seen = float(np.mean([(structure[:, i] == structure[:, 0])[ink].mean() for i in range(1, len(SEEN_INKS))]))
        hybrid = structure[:, 0] * n_colour + colour_codes[:, -1]  # red's structure, the held-out ink's colour
        with torch.no_grad():
            drawn = tok.decode(torch.from_numpy(hybrid.reshape(-1, CANVAS // GRID, CANVAS // GRID)))
        drawn = (drawn.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        right = np.mean([any(f["colour"] == colour and f["shape"] == shape for f in analyse_image(d)) for d in drawn])
        out[f"{colour} {shape}"] = {"agreement": round(agree, 3), "seen_agreement": round(seen, 3),
                                    "hybrid_right": round(float(right), 3), "objects": len(places),
                                    "ink_cells": int(ink.sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="image tokenizer folders, or folders holding one as image/ "
                    "(a tokenizer set or a model bundle)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {}
    for d in args.dirs:
        path = Path(d) / "image" if (Path(d) / "image").is_dir() else Path(d)
        if not (path / "config.yaml").is_file():
            sys.exit(f"{d}: no image tokenizer there")
        result[d] = measure(ImageTokenizer.load(path).eval())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

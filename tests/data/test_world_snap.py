"""Scenes on a pixel grid (`snap`, `side_step`): box corners and sides on the asked multiples in
every frame of every kind, the words still true of the pixels, and bad values refused."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from anymodal.data import scenes as S
from anymodal.data import world as W
from anymodal.data.checker import analyse_image
from anymodal.data.reader import iter_documents
from anymodal.errors import ConfigError

SNAP = ["snap=8", "side_step=4", "canvases={48x48: 0.6, 64x48: 0.2, 48x64: 0.2}", "kinds.prose=0"]


def truth_key(objs):
    return sorted((o["colour"], o["shape"], o["size"], o["position"], tuple(o["box"])) for o in objs)


def test_snapped_world_puts_every_box_on_the_grid(tmp_path):
    W.generate_world(tmp_path, "val", docs=300, seed=3, audio=False, progress=False, overrides=SNAP)
    sides, positions, n_frames = Counter(), Counter(), 0
    for doc in iter_documents(str(tmp_path / "val-*.tar"), image_size=None, audio=False,
                              kinds=("t2i", "i2t", "ground", "refer", "story")):
        frames = doc.meta.get("frames", [doc.meta["objects"]])
        for img, objs in zip(doc.images, frames, strict=True):
            n_frames += 1
            # the checker, at the image's own size, recovers every object and its words
            assert truth_key(analyse_image(img)) == truth_key(objs), doc.key
            for o in objs:
                x1, y1, x2, y2 = o["box"]
                assert x1 % 8 == 0 and y1 % 8 == 0, (doc.key, o)
                sides[(o["size"], x2 - x1)] += 1
                positions[o["position"]] += 1
    # 48 px short side: small boxes are 9-13 px, large 17-22 px, so multiples of 4 leave 12 and 20
    assert set(sides) == {("small", 12), ("large", 20)} and n_frames > 250
    assert set(positions) == set(S.POSITIONS)  # every position word is still reachable on the grid


def test_pick_side_keeps_the_size_word():
    rng = np.random.default_rng(0)
    for short in (48, 64, 96):
        for word in S.SIZES:
            for step in (1, 2, 4, 8):
                side = S.pick_side(rng, word, short, step)
                assert side % step == 0 and S.size_word(side, short) == word, (short, word, step, side)
    # no multiple of 8 lies in 48 px's small range (9-13 px): the one nearest its middle
    assert S.pick_side(rng, "small", 48, 8) == 8
    # every multiple of the step in the range is drawn: 48 px large is 17-22 px
    assert {S.pick_side(rng, "large", 48, 2) for _ in range(200)} == {18, 20, 22}


def test_story_moves_stay_on_the_grid():
    rng = np.random.default_rng(2)
    moved = 0
    for _ in range(50):
        scene = S.sample_scene(rng, 48, snap=8, side_step=4)
        for d in S.MOVES:
            after = S.move_object(rng, scene, 0, d, snap=8)
            if after is not None:
                moved += 1
                assert after.objects[0].box[0] % 8 == 0 and after.objects[0].box[1] % 8 == 0
                assert after.objects[0].box != scene.objects[0].box
    assert moved > 50
    assert S.move_object(rng, S.sample_scene(rng, 48), 0, "left", snap=64) is None  # no step fits


@pytest.mark.parametrize("key", ["snap", "side_step"])
def test_bad_grid_is_a_config_error(key):
    with pytest.raises(ConfigError, match=key):
        W.WorldConfig(**{key: 0})

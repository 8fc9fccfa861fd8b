"""The world checker: the image check and caption parser recover the truth of fresh scenes."""

from __future__ import annotations

import numpy as np
import pytest

from anymodal.data import scenes as S
from anymodal.data.checker import (
    analyse_image,
    caption_correct,
    classify_pixels,
    match_objects,
    objects_match,
    parse_caption,
    parse_referring,
    position_accuracy,
    size_accuracy,
)


def truth_key(objs):
    return sorted((o["colour"], o["shape"], o["size"], o["position"], tuple(o["box"])) for o in objs)


@pytest.mark.parametrize("canvas, n", [(64, 400), (32, 100), (96, 100)])
def test_image_check_recovers_fresh_scenes(canvas, n):
    rng = np.random.default_rng(1234 + canvas)
    ok = 0
    for _ in range(n):
        scene = S.sample_scene(rng, canvas)
        ok += truth_key(analyse_image(S.render_scene(scene))) == truth_key(scene.to_dicts())
    assert ok / n >= 0.995


def test_image_check_tolerates_noise_and_rejects_off_palette():
    rng = np.random.default_rng(5)
    ok = 0
    for _ in range(100):
        scene = S.sample_scene(rng, 64)
        noisy = np.clip(S.render_scene(scene).astype(int) + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8)
        got = analyse_image(noisy)
        ok += objects_match(got, scene.to_dicts()) and position_accuracy(got, scene.to_dicts()) == 1.0
    assert ok >= 99
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:30, 10:30] = (128, 128, 128)  # grey: farther than 60 from every palette colour and white
    img[40:43, 40:43] = (220, 40, 40)  # 9 red pixels: below the 12 px minimum
    assert analyse_image(img) == []
    assert (classify_pixels(img)[10:30, 10:30] == -1).all()


def test_shape_is_called_by_fill_ratio():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[4:24, 4:24] = (220, 40, 40)  # square, fill 1
    img[9:19, 9:19] = 255  # -> a ring, fill 0.75 -> circle by the rule
    img[40:60, 40:60] = (40, 80, 220)
    img[40:60, 40:60][np.triu(np.ones((20, 20), bool), 1)] = 255  # right triangle, fill 0.525
    img[30:34, 2:62] = (40, 170, 60)  # a bar, fill 1 -> square
    img[2:62, 30:31] = 255  # cut the bar: two bars
    ring = np.full((64, 64, 3), 255, np.uint8)
    ring[10:40, 10:40] = (235, 200, 40)
    ring[12:38, 12:38] = 255  # thin frame: fill 0.25 -> no shape
    got = {(o["colour"], o["shape"]) for o in analyse_image(img)}
    assert got == {("red", "circle"), ("blue", "triangle"), ("green", "square")}
    assert [o["shape"] for o in analyse_image(ring)] == [None]


def test_caption_parser_is_exact_on_world_captions():
    rng = np.random.default_rng(9)
    for i in range(1000):
        scene = S.sample_scene(rng, 64)
        cap = S.caption(scene, S.LEAD_INS[i % len(S.LEAD_INS)])
        parsed = parse_caption(cap)
        want = [{k: o[k] for k in ("size", "colour", "shape", "position")} for o in scene.to_dicts()]
        assert parsed == want, cap
        assert caption_correct(cap, scene.to_dicts())
    assert parse_caption("  A Small Red Circle at the top left.  ") == [
        {"size": "small", "colour": "red", "shape": "circle", "position": "top left"}]


@pytest.mark.parametrize("bad", ["", "a small red hexagon at the top", "a red circle at the top",
                                 "a small red circle at the moon", "a small red circle", "hello world",
                                 "a small red circle at the top and", "a small red circle at the top, blue"])
def test_caption_parser_rejects_what_is_not_a_caption(bad):
    assert parse_caption(bad) is None


def test_comparisons():
    t = [{"colour": "red", "shape": "circle", "size": "small", "position": "top"},
         {"colour": "blue", "shape": "square", "size": "large", "position": "center"}]
    p = [{"colour": "blue", "shape": "square", "size": "small", "position": "center"},
         {"colour": "red", "shape": "circle", "size": "small", "position": "left"}]
    assert objects_match(p, t) and not objects_match(p + p[:1], t) and not objects_match(p[:1], t)
    assert position_accuracy(p, t) == 0.5 and size_accuracy(p, t) == 0.5
    assert [m is not None for _, m in match_objects(p[:1], t)] == [False, True]
    assert not caption_correct("a small red circle at the top", t)
    assert caption_correct("a large blue square in the center and a small red circle at the top", t)
    assert parse_referring("<ref>the blue square</ref>") == ("blue", "square")
    assert parse_referring("the blue square and the red circle") is None

"""The world checker: the image check and caption parser recover the truth of fresh scenes."""

from __future__ import annotations

import numpy as np
import pytest

from anymodal.data import scenes as S
from anymodal.data.checker import (
    analyse_image,
    caption_aspect,
    caption_correct,
    classify_pixels,
    image_aspect,
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


@pytest.mark.parametrize("canvas", [(64, 48), (48, 64), (96, 48)])
def test_image_check_recovers_non_square_scenes_at_their_own_size(canvas):
    rng = np.random.default_rng(77 + canvas[0] + 3 * canvas[1])
    ok = 0
    for _ in range(200):
        scene = S.sample_scene(rng, canvas)
        img = S.render_scene(scene)
        assert img.shape == (canvas[1], canvas[0], 3) and image_aspect(img) == scene.aspect
        ok += truth_key(analyse_image(img)) == truth_key(scene.to_dicts())
    assert ok / 200 >= 0.995


def test_positions_and_sizes_are_judged_against_the_image_itself():
    wide = np.full((48, 64, 3), 255, np.uint8)
    wide[2:16, 48:62] = (220, 40, 40)  # 14 px in a 48 px short side: small; top right of a 64 x 48 image
    wide[18:36, 23:41] = (40, 80, 220)  # 18 px: large; center of the wide image (x centre 32 of 64)
    got = {o["colour"]: (o["size"], o["position"]) for o in analyse_image(wide)}
    assert got == {"red": ("small", "top right"), "blue": ("large", "center")}
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 48 x 64: the same objects mirrored on the diagonal
    got = {o["colour"]: (o["size"], o["position"]) for o in analyse_image(tall)}
    assert got == {"red": ("small", "bottom left"), "blue": ("large", "center")}
    assert image_aspect(wide) == "wide" and image_aspect(tall) == "tall" and image_aspect(wide[:, :48]) == "square"


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


@pytest.mark.parametrize("order", S.PHRASE_ORDERS)
def test_caption_parser_is_exact_on_world_captions(order):
    rng = np.random.default_rng(9)
    leads = S.caption_lead_ins(order)
    for i in range(1000):
        scene = S.sample_scene(rng, 64)
        cap = S.caption(scene, leads[i % len(leads)], phrase_order=order)
        parsed = parse_caption(cap)
        want = [{k: o[k] for k in ("size", "colour", "shape", "position")} for o in scene.to_dicts()]
        assert parsed == want, cap
        assert caption_correct(cap, scene.to_dicts())
    assert parse_caption("  A Small Red Circle at the top left.  ") == [
        {"size": "small", "colour": "red", "shape": "circle", "position": "top left"}]


def test_the_two_phrase_orders_say_the_same():
    scene = S.Scene(48, 48, (S.SceneObject("circle", "red", "small", (0, 0, 12, 12)),
                             S.SceneObject("square", "blue", "large", (14, 14, 34, 34))))
    assert S.caption(scene) == "a small red circle at the top left and a large blue square in the center"
    place_first = S.caption(scene, phrase_order="position_first")
    assert place_first == "at the top left a small red circle and in the center a large blue square"
    assert parse_caption(place_first) == parse_caption(S.caption(scene))
    assert parse_caption("picture: in the center a large blue square, at the top left a small red circle") == \
        parse_caption(S.caption(scene))[::-1]
    assert parse_caption("a large blue square at the top left a small red circle") is None  # neither order


def test_captions_that_ask_for_an_aspect():
    phrases = {"object_first": "a small red circle at the top left and a large blue square in the center",
               "position_first": "at the top left a small red circle and in the center a large blue square"}
    for order, phrase in phrases.items():
        for aspect in ("wide", "tall"):
            for lead in S.prompt_lead_ins(aspect, order):
                assert caption_aspect(lead + phrase) == aspect
                assert [o["colour"] for o in parse_caption(lead + phrase)] == ["red", "blue"]
    assert caption_aspect("a picture of a small red circle at the top") == "square"
    assert caption_aspect("a small red circle at the top") == "square"


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

"""Non-square scenes in the demo world: canvases in the asked proportions, "wide"/"tall" in the
prompts that ask for an image, boxes normalized to each image's own width and height, and square-only
configs writing the documents they always wrote."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from anymodal.data import scenes as S
from anymodal.data import world as W
from anymodal.data.checker import analyse_image, caption_aspect, caption_correct, parse_caption
from anymodal.data.reader import iter_documents
from anymodal.errors import ConfigError

CANVASES = "canvases={48x48: 0.5, 64x48: 0.25, 48x64: 0.25}"
IMAGE_KINDS = ("t2i", "i2t", "ground", "refer", "story")


def truth_key(objs):
    return sorted((o["colour"], o["shape"], o["size"], o["position"], tuple(o["box"])) for o in objs)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("canvases")
    W.generate_world(out, "val", docs=400, seed=4, audio=False, progress=False,
                     overrides=[CANVASES, "kinds.prose=0"])
    return out


def test_canvases_come_in_the_asked_proportions(mixed):
    shapes = Counter()
    for doc in iter_documents(str(mixed / "val-*.tar"), image_size=None, audio=False):
        sizes = {img.shape[:2] for img in doc.images}
        assert len(sizes) == 1  # a story's frames share one canvas
        (h, w), = sizes
        shapes[f"{w}x{h}"] += 1
        canvas = doc.meta.get("canvas")
        # meta.canvas is there exactly for the non-square scenes
        assert (canvas == [w, h]) if w != h else canvas is None, (doc.key, canvas, w, h)
    n = sum(shapes.values())
    assert set(shapes) == {"48x48", "64x48", "48x64"} and n > 300
    for name, p in (("48x48", 0.5), ("64x48", 0.25), ("48x64", 0.25)):
        assert abs(shapes[name] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, shapes  # 4 sigma


def test_prompts_say_wide_or_tall_and_boxes_fit_each_image(mixed):
    n_wide = n_tall = n_boxes = 0
    order = W.load_world_config().phrase_order  # the demo world's (the place first)
    for doc in iter_documents(str(mixed / "val-*.tar"), image_size=None, audio=False, kinds=IMAGE_KINDS):
        img = doc.images[0]
        h, w = img.shape[:2]
        aspect = S.aspect_word(w, h)
        n_wide += aspect == "wide"
        n_tall += aspect == "tall"
        texts = [s["text"] for s in doc.segments if "text" in s]
        truth = doc.meta["objects"]
        # the checker, at the image's own size, recovers every object with its size and position words
        assert truth_key(analyse_image(img)) == truth_key(truth), doc.key
        if doc.kind in ("t2i", "story"):  # the prompt asks for an image: it names the aspect
            assert caption_aspect(texts[0]) == aspect, texts[0]
            assert texts[0].startswith(S.prompt_lead_ins(aspect, order)) if aspect != "square" else \
                not any(word in texts[0] for word in ("wide", "tall"))
            assert caption_correct(texts[0], truth)
        if doc.kind == "i2t":  # a caption of a given image needs no aspect word
            assert caption_aspect(texts[-1]) == "square" and caption_correct(texts[-1], truth)
        for seg in doc.segments:
            if "box" in seg:  # normalized to the image's own width and height
                px = np.array(seg["box"]) * [w, h, w, h]
                assert any(np.allclose(px, o["box"]) for o in truth), (doc.key, px)
                n_boxes += 1
    assert n_wide > 20 and n_tall > 20 and n_boxes > 50


def test_spoken_captions_of_a2i_say_the_aspect():
    cfg = W.load_world_config(None, [CANVASES, "kinds={t2i: 0, i2t: 0, ground: 0, refer: 0, asr: 0, "
                                     "tts: 0, a2i: 1, story: 0, prose: 0}"])
    seen = Counter()
    for i in range(80):
        d = W.plan_document(cfg, "train", 2, i, audio=True)  # planned only: no espeak-ng needed
        assert d.kind == "a2i"
        scene = d.segments[-1]["image"]
        seen[scene.aspect] += 1
        assert caption_aspect(d.meta["transcript"]) == scene.aspect
        assert d.segments[0]["audio"].text == d.meta["transcript"]
        assert parse_caption(d.meta["transcript"]) is not None
    assert set(seen) == {"square", "wide", "tall"}


def test_geometry_is_relative_to_the_canvas():
    rng = np.random.default_rng(0)
    for canvas in ((64, 48), (48, 64), (96, 48)):
        w, h = canvas
        for _ in range(200):
            sc = S.sample_scene(rng, canvas)
            assert (sc.width, sc.height) == canvas
            for o in sc.objects:
                x1, y1, x2, y2 = o.box
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and x2 - x1 == y2 - y1  # square, inside
                lo, hi = S.side_range(o.size, min(w, h))  # sizes against the short side
                assert lo <= x2 - x1 <= hi
    # the same box is at the right of a 48 x 48 canvas and in the center of a 64 x 48 one (and the
    # bottom of a square one is the center of a tall one)
    box = (30, 18, 42, 30)
    assert S.position_word(box, 48, 48) == "right" and S.position_word(box, 64, 48) == "center"
    assert S.position_word((18, 28, 30, 40), 48, 48) == "bottom" and S.position_word((18, 28, 30, 40), 48, 64) == "center"
    wide = S.Scene(64, 48, (S.SceneObject("circle", "red", "small", box),))
    assert S.caption(wide, S.prompt_lead_ins(wide.aspect)[0]) == "a wide picture of a small red circle in the center"
    assert S.render_scene(wide).shape == (48, 64, 3)
    moved = S.move_object(np.random.default_rng(1), wide, 0, "left")
    assert moved is not None and moved.canvas == (64, 48) and moved.objects[0].box[0] < box[0]


def _digest(cfg: W.WorldConfig) -> str:
    """A hash of 2 x 60 planned documents: texts, meta, utterances and rendered pixels."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(60):
            d = W.plan_document(cfg, split, 11, i, audio=True)
            segments = list(d.segments)
            if d.kind == "ground":  # hashed in the image-first order the digest was taken in
                segments.insert(0, segments.pop(1))
            segs = []
            for s in segments:
                if "image" in s:
                    h.update(S.render_scene(s["image"]).tobytes())
                    segs.append("img")
                elif "audio" in s:
                    u = s["audio"]
                    segs.append([u.text, u.voice, u.speed, u.pitch])
                else:
                    segs.append(s)
            h.update(json.dumps([d.key, d.kind, segs, d.meta], sort_keys=True).encode())
    return h.hexdigest()


# the digest of the square-only world (image_size 48) as written before canvases existed (ground
# documents then put their image before the first query: the same documents, in another order)
SQUARE_DIGEST = "c33758e04e62cb0dd1d9be1ac77950a1f8b4612f0b5fd616df59ef69fd42ad9b"


def test_square_only_configs_keep_their_documents():
    # objects anywhere (the demo default puts them on an 8 px grid), as before snapping existed,
    # a2i answers that are the picture alone, as before a2i_answer existed, and captions that name
    # the object before its place, as before phrase_order existed
    old = ["image_size=48", "snap=1", "side_step=1", "a2i_answer=image", "phrase_order=object_first"]
    base = W.load_world_config(None, old)
    one = W.load_world_config(None, [*old, "canvases={48x48: 1, 64x48: 0, 48x64: 0}"])
    none = W.WorldConfig(**{**{k: getattr(base, k) for k in base.__dataclass_fields__}, "canvases": {}})
    assert _digest(one) == _digest(none) == SQUARE_DIGEST
    assert _digest(base) != SQUARE_DIGEST  # the demo's default now mixes in wide and tall scenes


@pytest.mark.parametrize("canvases, match", [({"64by48": 1.0}, "WIDTHxHEIGHT"), ({"20x48": 1.0}, "at least 24"),
                                             ({"64x48": -1.0}, "negative"), ({"64x48": 0.0}, "positive sum")])
def test_bad_canvases_are_config_errors(canvases, match):
    with pytest.raises(ConfigError, match=match):
        W.WorldConfig(canvases=canvases)


def test_a2i_answers_can_say_what_was_heard_before_the_picture():
    cfg = W.load_world_config(None, ["kinds={t2i: 0, i2t: 0, ground: 0, refer: 0, asr: 0, tts: 0, a2i: 1, "
                                     "story: 0, prose: 0}", "a2i_answer=transcript_image"])
    plain = W.load_world_config(None, ["kinds={t2i: 0, i2t: 0, ground: 0, refer: 0, asr: 0, tts: 0, a2i: 1, "
                                       "story: 0, prose: 0}", "a2i_answer=image"])
    for i in range(20):
        d = W.plan_document(cfg, "train", 2, i, audio=True)
        assert [next(iter(s)) for s in d.segments] == ["audio", "text", "text", "image"]
        assert d.meta["prompt_segments"] == 2 and d.segments[2]["text"] == d.meta["transcript"]
        p = W.plan_document(plain, "train", 2, i, audio=True)  # the same document without the transcript
        assert [next(iter(s)) for s in p.segments] == ["audio", "text", "image"]
        assert p.meta == d.meta and p.segments[1] == d.segments[1]
    with pytest.raises(ConfigError, match="a2i_answer"):
        W.load_world_config(None, ["a2i_answer=speech"])

"""The demo world generator: determinism, kinds, split separation, speech, CLI errors."""

from __future__ import annotations

import io
import json
import re
import tarfile
import wave
from collections import Counter

import numpy as np
import pytest

from anymodal.cli import main
from anymodal.config import load_config
from anymodal.data import world as W
from anymodal.data.checker import analyse_image, caption_correct, parse_caption, parse_referring
from anymodal.data.cues import CUES
from anymodal.data.reader import iter_documents, iter_samples
from anymodal.data.speech import espeak_available
from anymodal.demo import DemoConfig
from anymodal.errors import ConfigError, UserError

HAVE_ESPEAK = espeak_available()
UNSEEN = {("purple", "triangle"), ("orange", "square")}


def wh(img) -> np.ndarray:
    """[w, h, w, h] of an image: a normalized box times this is in its pixels."""
    h, w = img.shape[:2]
    return np.array([w, h, w, h])


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small train and val corpus (with speech when espeak-ng is installed)."""
    root = tmp_path_factory.mktemp("world")
    train = W.generate_world(root / "a", "train", docs=300, seed=7, shard_size=100, progress=False)
    val = W.generate_world(root / "a", "val", docs=200, seed=7, shard_size=100, progress=False)
    return root, train, val


def test_generation_is_deterministic_and_prefix_stable(corpus, tmp_path):
    root, train, _ = corpus
    again = W.generate_world(tmp_path / "b", "train", docs=300, seed=7, shard_size=100, progress=False)
    assert again["shards"] == train["shards"] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    for name in train["shards"]:  # byte-identical tars: JSON, PNG and WAV alike
        assert (root / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a shorter corpus is a prefix of the longer one (document i depends on (seed, split, i) only)
    W.generate_world(tmp_path / "c", "train", docs=50, seed=7, progress=False)
    short, full = members(tmp_path / "c" / "train-00000.tar"), members(root / "a" / "train-00000.tar")
    assert short and all(full[k] == v for k, v in short.items())
    other = W.generate_world(tmp_path / "d", "train", docs=50, seed=8, progress=False)
    assert members(tmp_path / "d" / other["shards"][0]) != short


def test_every_kind_with_its_layout(corpus):
    root, train, _ = corpus
    kinds = set(W.KINDS) if HAVE_ESPEAK else set(W.KINDS) - set(W.AUDIO_KINDS)
    assert {k for k, n in train["counts"].items() if n} == kinds
    # cued kinds: the cue is the prompt's last text segment, the answer follows it
    layouts = {"t2i": ["text", "image"], "i2t": ["image", "text", "text"], "ground": ["text", "image", "box"],
               "refer": ["image", "text", "box", "text"], "asr": ["audio", "text", "text"],
               "tts": ["text", "audio"], "a2i": ["audio", "text", "text", "image"], "prose": ["text"]}
    cue_at = {"i2t": 1, "ground": 0, "refer": 1, "asr": 1, "a2i": 1, "tts": 0}
    seen = set()
    for doc in iter_documents(root / "a" / "train-*.tar", image_size=None):  # native size: pixel boxes hold
        seen.add(doc.kind)
        names = [next(iter(s)) for s in doc.segments]
        if doc.kind == "story":
            assert names in (["text", "image"] * 2, ["text", "image"] * 3)
            assert len(doc.meta["frames"]) == len(doc.images)
            for img, frame in zip(doc.images, doc.meta["frames"]):
                got = {(o["colour"], o["shape"], tuple(o["box"])) for o in analyse_image(img)}
                assert got == {(o["colour"], o["shape"], tuple(o["box"])) for o in frame}
            assert all(s["text"].startswith("then ") for s in doc.segments[2::2])
        elif doc.kind == "ground":  # a query/answer per object, up to max_queries (3); the image after the first query
            assert names == layouts["ground"] + ["text", "box"] * (min(3, len(doc.meta["objects"])) - 1)
        elif doc.kind == "refer":
            assert names == layouts[doc.kind][:1] + layouts[doc.kind][1:] * min(3, len(doc.meta["objects"]))
        else:
            assert names == layouts[doc.kind], doc.kind
        assert 0 <= doc.meta["prompt_segments"] < len(doc.segments)
        if doc.kind in cue_at:
            text = doc.segments[cue_at[doc.kind]]["text"]
            phrasings = [p.split("{ref}")[0] for p in CUES[doc.kind]]
            assert any(text.startswith(p) for p in phrasings), (doc.kind, text)
            if doc.kind not in ("tts", "ground"):  # the prompt ends with its cue
                assert doc.meta["prompt_segments"] == cue_at[doc.kind] + 1 + (doc.kind == "refer")
            if doc.kind == "ground":  # the query, then the image it asks about
                assert doc.meta["prompt_segments"] == 2
        texts = [s["text"] for s in doc.segments if "text" in s]
        if doc.kind in ("ground", "refer"):
            target = doc.meta["objects"][doc.meta["target"]]
            box = next(s["box"] for s in doc.segments if "box" in s)
            assert np.allclose(np.array(box) * wh(doc.images[0]), target["box"])  # normalized to the image
            first_ref = next(t for t in texts if "<ref>" in t)  # the first query is about the target
            assert parse_referring(first_ref) == (target["colour"], target["shape"])
        if doc.kind in ("t2i", "i2t"):
            assert caption_correct(texts[0 if doc.kind == "t2i" else -1], doc.meta["objects"])
        if doc.kind in ("asr", "tts"):
            assert texts[-1].endswith(doc.meta["transcript"])
        if doc.kind == "a2i":  # the demo world's a2i answer says what was heard, then draws it
            assert texts[-1] == doc.meta["transcript"] and doc.meta["prompt_segments"] == 2
        if doc.kind in ("asr", "tts", "a2i"):
            wav = doc.audio[0]
            assert wav.dtype == np.float32 and 0.4 * 16000 < len(wav) < 15 * 16000
            assert 0.05 < np.abs(wav).max() <= 1.0  # speech, not silence
        if doc.kind == "prose":
            assert len(doc.text) > 100 and not re.search(r"</?[a-z_0-9]+>", doc.text)
    assert seen == kinds


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")
def test_speech_is_16k_mono_and_says_the_transcript(corpus):
    root, _, _ = corpus
    n = 0
    for sample in iter_samples(str(root / "a" / "train-00000.tar")):
        rec = json.loads(sample["json"])
        wavs = [k for k in sample if k.endswith(".wav")]
        if not wavs:
            continue
        with wave.open(io.BytesIO(sample[wavs[0]])) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            seconds = w.getnframes() / 16000
        words = len(rec["meta"]["transcript"].split())
        # espeak is asked for 150-210 words per minute (short template words come out faster), plus pauses
        assert words * 60 / 320 < seconds < words * 60 / 110 + 1.5, (words, seconds)
        n += 1
    assert n > 10


def test_unseen_pairs_never_in_train_and_marked_in_val(corpus):
    root, _, val = corpus
    for doc in iter_documents(root / "a" / "train-*.tar", audio=False):
        assert doc.meta["unseen"] is False
        for img in doc.images:  # check the pixels, not only the metadata
            assert not {(o["colour"], o["shape"]) for o in analyse_image(img)} & UNSEEN
        words = doc.text.lower()
        assert "purple triangle" not in words and "orange square" not in words
        objs = [o for f in doc.meta.get("frames", [doc.meta.get("objects", [])]) for o in f]
        assert not {(o["colour"], o["shape"]) for o in objs} & UNSEEN
    n_unseen = 0
    for doc in iter_documents(root / "a" / "val-*.tar", audio=False):
        objs = [o for f in doc.meta.get("frames", [doc.meta.get("objects", [])]) for o in f]
        has = bool({(o["colour"], o["shape"]) for o in objs} & UNSEEN)
        assert doc.meta["unseen"] is has
        n_unseen += has
    assert n_unseen == val["unseen_docs"] and 0.15 * 200 < n_unseen < 0.45 * 200


def test_checker_recovers_fresh_world_images_and_captions(corpus):
    root, _, _ = corpus
    n_img = ok_img = n_cap = 0
    for doc in iter_documents(root / "a" / "val-*.tar", kinds=["t2i", "i2t", "a2i", "ground", "refer"],
                              audio=False, image_size=None):
        truth = doc.meta["objects"]
        got = analyse_image(doc.images[0])
        n_img += 1
        ok_img += sorted((o["colour"], o["shape"], o["size"], o["position"], tuple(o["box"])) for o in got) == \
            sorted((o["colour"], o["shape"], o["size"], o["position"], tuple(o["box"])) for o in truth)
        if doc.kind in ("t2i", "i2t"):  # the caption: the t2i prompt, the i2t answer (after its cue)
            cap = [s["text"] for s in doc.segments if "text" in s][0 if doc.kind == "t2i" else -1]
            assert parse_caption(cap) is not None and caption_correct(cap, truth), cap
            n_cap += 1
    assert n_img > 80 and n_cap > 40
    assert ok_img / n_img >= 0.995


def _demo_source_overrides(name: str) -> list[str]:
    return next(x for x in load_config(DemoConfig, "demo").world.extra_sources if x["name"] == name)["overrides"]


@pytest.mark.parametrize("source", ["max_queries=3", "demo many_objects"])
def test_ground_and_refer_ask_about_up_to_max_queries_objects(tmp_path, source):
    # the demo's many-object source (configs/demo.yaml) asks one query per document, so no answer
    # there can be had by elimination (the object not boxed yet)
    overrides, max_q = (["max_queries=3"], 3) if source == "max_queries=3" else (_demo_source_overrides("many_objects"), 1)
    W.generate_world(tmp_path, "val", docs=120, seed=2, progress=False, audio=False,
                     overrides=[*overrides, "kinds.ground=5", "kinds.refer=5"])
    n_multi, kinds = 0, Counter()
    for doc in iter_documents(str(tmp_path / "val-*.tar"), audio=False, kinds=["ground", "refer"], image_size=None):
        objs, n = doc.meta["objects"], doc.meta["prompt_segments"]
        boxes = [s["box"] for s in doc.segments if "box" in s]
        refs = [parse_referring(s["text"]) for s in doc.segments if "text" in s and "<ref>" in s["text"]]
        assert len(boxes) == len(refs) == min(max_q, len(objs))  # one query per object, up to max_queries
        assert len({tuple(b) for b in boxes}) == len(boxes)
        for box, ref in zip(boxes, refs):  # each answer belongs to its own query
            o = next(o for o in objs if (o["colour"], o["shape"]) == ref)
            assert np.allclose(np.array(box) * wh(doc.images[0]), o["box"])  # boxes are normalized
        target = objs[doc.meta["target"]]
        assert refs[0] == (target["colour"], target["shape"])  # the first query is the eval target
        assert n == (2 if doc.kind == "ground" else 3) and ("box" in doc.segments[n]) == (doc.kind == "ground")
        n_multi += len(boxes) > 1
        kinds[doc.kind, len(objs) > 1] += 1
    if max_q > 1:
        assert n_multi > 40
    else:  # every scene of the source has two or three objects to choose from
        assert kinds["ground", True] > 20 and kinds["refer", True] > 10 and not n_multi, kinds
        assert kinds["ground", False] == kinds["refer", False] == 0, kinds


def test_min_objects_gives_scenes_of_at_least_that_many(tmp_path):
    over = ["min_objects=2", "kinds.prose=0", "kinds.story=0.5"]
    W.generate_world(tmp_path, "train", docs=150, seed=4, progress=False, audio=False, overrides=over)
    docs = list(iter_documents(str(tmp_path / "train-*.tar"), audio=False, image_size=None,
                               kinds=["t2i", "i2t", "ground", "refer", "story"]))
    counts = Counter(len(d.meta.get("frames", [d.meta.get("objects")])[0]) for d in docs)
    assert set(counts) == {2, 3} and min(counts.values()) > 30, counts  # 2 and 3, about evenly
    assert any(d.kind == "story" for d in docs)
    with pytest.raises(ConfigError, match="min_objects"):
        W.WorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ConfigError, match="min_objects"):
        W.WorldConfig(min_objects=0)


def test_without_espeak_no_audio_docs_and_one_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(W, "espeak_available", lambda: False)
    monkeypatch.setattr(W, "_WARNED_NO_ESPEAK", False)
    s1 = W.generate_world(tmp_path / "x", "train", docs=60, seed=1, progress=False)
    W.generate_world(tmp_path / "y", "val", docs=20, seed=1, progress=False)
    assert s1["audio"] is False and sum(s1["counts"][k] for k in W.AUDIO_KINDS) == 0
    assert sum(s1["counts"].values()) == 60
    err = capsys.readouterr().err
    assert err.count("espeak-ng not found") == 1
    with pytest.raises(UserError, match="espeak-ng"):
        W.generate_world(tmp_path / "z", "train", docs=5, require_audio=True, progress=False)
    assert main(["world", "--out", str(tmp_path / "z"), "--docs", "5", "--require-audio", "--quiet"]) == 2


@pytest.mark.parametrize("args", [
    ["--docs", "0"],
    ["--shard-size", "0"],
    ["bogus_key=1"],
    ["kinds.t2v=1"],
    ["unseen=[pink hexagon]"],
    ["canvases.64by48=1"],
    ["canvases.16x48=1"],
    ["canvases.64x48=-1"],
    ["canvases={48x48: 0, 64x48: 0, 48x64: 0}"],
    ["--config", "no/such/world.yaml"],
])
def test_cli_bad_arguments_exit_2(args, tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "o"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anymodal: error:")


def test_cli_argparse_errors_exit_2(tmp_path):
    for bad in (["--split", "test"], ["--docs", "many"], []):
        with pytest.raises(SystemExit) as e:
            main(["world", *bad] + (["--out", str(tmp_path)] if bad else []))
        assert e.value.code == 2


def test_cli_writes_shards_and_summary(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path), "--split", "val", "--docs", "25", "--seed", "3",
                 "--shard-size", "10", "--no-audio", "image_size=40",
                 "canvases={40x40: 1, 48x48: 0, 64x48: 0, 48x64: 0}"]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert brief["docs"] == 25 and brief["shards"] == 3 and brief["audio"] is False
    summary = json.loads((tmp_path / "val.json").read_text())
    assert summary["config"]["image_size"] == 40 and len(summary["shards"]) == 3
    imgs = [d.images[0] for d in iter_documents(tmp_path, image_size=None, audio=False) if d.images]
    assert imgs and all(i.shape == (40, 40, 3) for i in imgs)


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")
def test_unknown_voice_is_a_user_error_and_leaves_no_partial_shard(tmp_path):
    with pytest.raises(UserError, match="voice"):
        W.generate_world(tmp_path, "train", docs=40, seed=0, overrides=["voices=[no-such-voice]"],
                         progress=False)
    assert not list(tmp_path.glob("*.tar*"))


def test_captions_in_reading_order(tmp_path):
    """caption_order=reading lists a scene's objects top row first, left to right (as a raster-order
    image draws them); the default keeps the scene's own random order, and both captions parse back
    to the same objects."""
    orders = {"reading": [], "scene": []}
    for order in orders:
        W.generate_world(tmp_path / order, "train", docs=60, seed=3, progress=False, audio=False,
                         overrides=[f"caption_order={order}", "kinds.t2i=1", "kinds.i2t=1", "kinds.ground=0",
                                    "kinds.refer=0", "kinds.story=0", "kinds.prose=0"])
        for doc in iter_documents(str(tmp_path / order / "train-*.tar"), audio=False, image_size=None):
            text = next(s["text"] for s in (doc.segments if doc.kind == "t2i" else doc.segments[::-1]) if "text" in s)
            parsed = parse_caption(text)
            assert caption_correct(text, doc.meta["objects"]), text
            cells = [W.S.POSITIONS.index(o["position"]) for o in parsed]
            orders[order].append(cells)
    multi = [c for c in orders["reading"] if len(c) > 1]
    assert len(multi) > 20 and all(c == sorted(c) for c in multi)
    assert any(c != sorted(c) for c in orders["scene"] if len(c) > 1)  # scene order is not reading order
    with pytest.raises(UserError, match="caption_order"):
        W.load_world_config(None, ["caption_order=random"])


def test_phrase_order_moves_the_place_and_nothing_else(tmp_path):
    """phrase_order=position_first names each object's place before it ("at the top left a small
    red circle", the demo's); the documents are otherwise those of object_first, and both parse
    back to their scene."""
    texts = {}
    for order in W.S.PHRASE_ORDERS:
        W.generate_world(tmp_path / order, "train", docs=40, seed=5, progress=False, audio=False,
                         overrides=[f"phrase_order={order}", "kinds.t2i=1", "kinds.i2t=1", "kinds.ground=0",
                                    "kinds.refer=0", "kinds.story=0", "kinds.prose=0"])
        texts[order] = []
        for doc in iter_documents(str(tmp_path / order / "train-*.tar"), audio=False, image_size=None):
            text = next(s["text"] for s in (doc.segments if doc.kind == "t2i" else doc.segments[::-1]) if "text" in s)
            assert caption_correct(text, doc.meta["objects"]), text
            texts[order].append((doc.kind, text, parse_caption(text)))
    for (kind, a, pa), (kind_b, b, pb) in zip(texts["object_first"], texts["position_first"], strict=True):
        assert kind == kind_b and pa == pb and a != b
        assert b.split(": ")[-1].startswith(("at the ", "in the center ")), b
    with pytest.raises(UserError, match="phrase_order"):
        W.load_world_config(None, ["phrase_order=backwards"])


def test_prose_paragraphs_are_running_prose_shipped_with_the_package():
    paras = W.prose_paragraphs()
    assert len(paras) == 478  # as taken, repeats included: the documents index into this list
    for p in paras:
        assert 80 <= len(p) <= 1500 and p[-1] in ".!?" and "\n" not in p
        assert not re.search(r"</?[a-z_0-9]+>", p)  # nothing that reads as a special piece


def test_t2i_omit_leaves_words_out_of_train_prompts_only(tmp_path):
    """t2i_omit: a share of train t2i prompts leave out each object's colour (the picture still
    shows it); the rest of the prompt is whole, and val prompts are never cut (the checks read them)."""
    over = ["t2i_omit.colour=0.5", "kinds.t2i=1", "kinds.i2t=0", "kinds.ground=0", "kinds.refer=0",
            "kinds.story=0", "kinds.prose=0"]
    colour_re = re.compile(r"\b(" + "|".join(W.S.COLOURS) + r")\b")
    for split in ("train", "val"):
        W.generate_world(tmp_path / split, split, docs=80, seed=3, progress=False, audio=False, overrides=over)
        docs = list(iter_documents(str(tmp_path / split / f"{split}-*.tar"), audio=False, image_size=None))
        cut = [d for d in docs if d.meta.get("omitted")]
        for d in docs:
            text, objects = d.segments[0]["text"], d.meta["objects"]
            shapes = re.findall(r"\b(" + "|".join(W.S.SHAPES) + r")\b", text)
            assert sorted(shapes) == sorted(o["shape"] for o in objects), text
            assert sorted(re.findall(r"\b(small|large)\b", text)) == sorted(o["size"] for o in objects), text
            found = analyse_image(np.asarray(d.images[0]))
            assert sorted(o["colour"] for o in found) == sorted(o["colour"] for o in objects)  # drawn in colour
            if d.meta.get("omitted"):
                assert d.meta["omitted"] == ["colour"] and not colour_re.search(text), text
            else:
                assert caption_correct(text, objects), text
        if split == "train":
            assert 20 < len(cut) < 60, len(cut)
        else:
            assert not cut
    phrase = W.S.describe(W.S.SceneObject("circle", "red", "large", (0, 0, 20, 20)), 48, 48, "position_first",
                          frozenset({"shape", "position"}))
    assert phrase == "a large red shape"
    with pytest.raises(UserError, match="t2i_omit"):
        W.load_world_config(None, ["t2i_omit.texture=0.5"])
    with pytest.raises(UserError, match="t2i_omit"):
        W.load_world_config(None, ["t2i_omit.colour=1.5"])


def test_prompt_phrase_order_orders_prompts_and_leaves_captions(tmp_path):
    """prompt_phrase_order sets the order of captions that ask for an image (t2i); captions the
    model writes (i2t) keep phrase_order; both parse back to their scene."""
    W.generate_world(tmp_path, "train", docs=60, seed=5, progress=False, audio=False,
                     overrides=["phrase_order=position_first", "prompt_phrase_order=object_first", "kinds.t2i=1",
                                "kinds.i2t=1", "kinds.ground=0", "kinds.refer=0", "kinds.story=0", "kinds.prose=0"])
    kinds = Counter()
    for doc in iter_documents(str(tmp_path / "train-*.tar"), audio=False, image_size=None):
        text = doc.segments[0]["text"] if doc.kind == "t2i" else doc.segments[-1]["text"]
        assert caption_correct(text, doc.meta["objects"]), text
        body = text.split(": ")[-1]
        assert body.startswith(("at the ", "in the center ")) == (doc.kind == "i2t"), (doc.kind, text)
        kinds[doc.kind] += 1
    assert kinds["t2i"] > 15 and kinds["i2t"] > 15
    with pytest.raises(UserError, match="prompt_phrase_order"):
        W.load_world_config(None, ["prompt_phrase_order=backwards"])

"""`anymodal eval` on non-square scenes: images read at their own aspect by a native image tokenizer,
t2i drawn at the model's own grid and checked at its own size, and the `by_aspect` report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anymodal.data.world import generate_world
from anymodal.eval.metrics import by_aspect, format_table
from anymodal.eval.run import EvalOptions, Evaluator, doc_aspect, evaluate
from anymodal.sample.bundle import tiny_bundle

from .test_eval_metrics import oracle_engine

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny image tokenizer: 4 px a code, at most 16 codes; native grids: 48x48 -> 4x4, 64x48 -> 3x4, 48x64 -> 4x3
GRIDS = {"square": (4, 4), "wide": (3, 4), "tall": (4, 3)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, "val", docs=90, seed=5, progress=False, audio=False,
                   overrides=["canvases={48x48: 0.2, 64x48: 0.4, 48x64: 0.4}", "kinds.prose=0", "kinds.story=0"])
    return str(out / "val-*.tar")


@pytest.fixture(scope="module")
def bundle():
    b = tiny_bundle(max_seq_len=512)
    b.tok.image.cfg.model.image_mode = "native"  # each image keeps its aspect within 16 codes
    return b


def test_native_eval_reads_each_image_at_its_own_aspect(bundle, world):
    ev = Evaluator(bundle, EvalOptions(limit=6, progress=False))
    per_kind, _, _ = ev.read(world)
    sp = bundle.space
    seen = set()
    for kind in ("i2t", "ground", "refer"):
        for d in per_kind[kind]:
            aspect = doc_aspect(d)
            h, w = GRIDS[aspect]
            assert d.images[0].shape == (4 * h, 4 * w, 3), (kind, aspect)
            p = ev.prompt(d)
            at = p.index(sp.boi)
            assert p[at + 1: at + 3] == [sp.size_id(h), sp.size_id(w)]  # the image states its own grid
            seen.add(aspect)
    assert seen == {"square", "wide", "tall"}
    # a t2i prompt leaves room for the longest grid the model may pick, and is only skipped when
    # even the grid of the aspect it asks for cannot fit
    for d in per_kind["t2i"]:
        new, least = ev.image_budget(d)
        assert new == sp.image_max_span(16) and least == sp.image_span(*GRIDS[doc_aspect(d)])


def test_a_perfect_model_draws_and_points_right_on_every_aspect(bundle, world):
    """An oracle that answers with the documents' truth: each drawn image has the grid (so the aspect)
    asked for, and boxes on wide and tall images land on their objects."""
    ev = Evaluator(bundle, EvalOptions(limit=8, batch_size=4, progress=False))
    per_kind, _, _ = ev.read(world)
    ev.engine = oracle_engine(ev, bundle, per_kind, ("t2i", "i2t", "ground", "refer"), max_image_tokens=16)
    ev.image_task("t2i", per_kind["t2i"])
    ev.ground_task(per_kind["ground"])
    ev.text_task("i2t", per_kind["i2t"])
    ev.text_task("refer", per_kind["refer"])
    r = ev.metrics.result()
    assert r["t2i_aspect_match"] == 1.0 and r["n"]["t2i"] == len(per_kind["t2i"])
    for e in ev.examples:
        if e["task"] == "t2i":
            assert e["drawn_aspect"] == e["aspect"] and tuple(e["grid"]) == GRIDS[e["aspect"]]
    aspects = by_aspect(ev.examples)
    for group in ("wide", "tall", "non_square"):
        row = aspects[group]
        assert row["n"]["t2i"] and row["n"]["ground"], (group, row["n"])
        assert row["t2i_aspect_match"] == 1.0 and row["grounding_acc50"] == 1.0
        assert row["caption_accuracy"] in (None, 1.0) and row["refer_accuracy"] in (None, 1.0)
    assert r["grounding_acc50"] == 1.0 and r["caption_accuracy"] == 1.0 and r["refer_accuracy"] == 1.0


def test_the_non_square_report_of_a_tiny_run(bundle, world, tmp_path, capsys):
    examples = tmp_path / "examples.jsonl"
    r = evaluate(bundle, world, tmp_path / "metrics.json",
                 EvalOptions(limit=6, batch_size=6, progress=False, tasks=("t2i", "ground"), examples=examples))
    assert json.loads((tmp_path / "metrics.json").read_text()) == r
    ex = [json.loads(line) for line in examples.read_text().splitlines()]
    t2i = [e for e in ex if e["task"] == "t2i"]
    assert len(t2i) == r["n"]["t2i"] == 6
    for e in t2i:  # the untrained model picks its own grid within 16 codes; the check reads it at that size
        if e["grid"] is not None:
            h, w = e["grid"]
            assert 1 <= h * w <= 16 and e["drawn_aspect"] == ("square" if h == w else "wide" if w > h else "tall")
    assert r["t2i_aspect_match"] == pytest.approx(np.mean([e["aspect_match"] for e in t2i]))
    groups = r["by_aspect"]
    assert groups["non_square"]["n"]["t2i"] == groups["wide"]["n"]["t2i"] + groups["tall"]["n"]["t2i"] > 0
    assert groups["non_square"]["n"]["ground"] > 0
    for g, aspects in (("wide", ("wide",)), ("non_square", ("wide", "tall"))):
        sub = [e for e in ex if e["task"] == "ground" and e["aspect"] in aspects]
        assert groups[g]["grounding_miou"] == pytest.approx(np.mean([e["iou"] for e in sub]))
    assert groups["square"]["caption_accuracy"] is None  # no i2t asked: null, not 0
    printed = capsys.readouterr().out
    assert "by aspect" in printed and "t2i_aspect_match" in printed
    assert "by aspect" not in format_table({**r, "by_aspect": by_aspect([e for e in ex if e["aspect"] == "square"])})

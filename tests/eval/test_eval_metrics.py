"""Metric code against hand-made cases, and `anymodal eval` end to end on a tiny world."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anymodal.cli import main
from anymodal.data.world import generate_world
from anymodal.eval.metrics import Metrics, edit_distance, format_table, image_check, word_errors
from anymodal.eval.run import EvalOptions, Evaluator, by_objects
from anymodal.sample.bundle import save_bundle_layout, tiny_bundle
from anymodal.sample.engine import Engine

WORLD_KEYS = {"t2i_accuracy", "t2i_position_accuracy", "t2i_size_accuracy", "t2i_aspect_match", "a2i_accuracy",
              "a2i_aspect_match", "caption_accuracy", "grounding_acc50", "grounding_miou", "refer_accuracy", "asr_wer",
              "tts_wer", "bits_per_token", "n", "unseen"}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- metric code by hand ----------------------------------------------------------------------------------
def test_word_errors_by_hand():
    assert edit_distance("a b c".split(), "a x c".split()) == 1
    assert edit_distance("a b c".split(), "a c".split()) == 1  # deletion
    assert edit_distance("a b".split(), "a b c d".split()) == 2  # insertions
    assert edit_distance([], "a".split()) == 1
    assert word_errors("The red circle.", "the red  square") == (1, 3)  # case and punctuation ignored
    assert word_errors("a small red circle", "a red circles") == (2, 4)
    assert word_errors("show me", "Show me, please!") == (1, 2)
    m = Metrics()
    m.add_wer("asr", "the red circle", "the red square")  # 1 error / 3 words
    m.add_wer("asr", "say hello", "say hello", unseen=True)  # 0 / 2
    r = m.result()
    assert r["asr_wer"] == pytest.approx(1 / 5)  # corpus WER: errors over all reference words
    assert r["unseen"]["asr_wer"] == 0.0
    assert r["n"]["asr"] == 2 and r["unseen"]["n"]["asr"] == 1


def test_grounding_aggregation_by_hand():
    m = Metrics()
    for iou, unseen in ((1.0, False), (0.5, True), (0.2, True)):
        m.add_ground(iou, unseen)
    r = m.result()
    assert r["grounding_acc50"] == pytest.approx(2 / 3)  # IoU >= 0.5 counts
    assert r["grounding_miou"] == pytest.approx((1.0 + 0.5 + 0.2) / 3)
    assert r["unseen"]["grounding_acc50"] == pytest.approx(0.5)
    assert r["unseen"]["grounding_miou"] == pytest.approx(0.35)


def test_image_check_and_accuracy_aggregation():
    truth = [{"colour": "red", "shape": "circle", "size": "small", "position": "top left"},
             {"colour": "blue", "shape": "square", "size": "large", "position": "center"}]
    right = [{"colour": "blue", "shape": "square", "size": "large", "position": "center"},
             {"colour": "red", "shape": "circle", "size": "large", "position": "top left"}]
    assert image_check(truth, right) == {"correct": 1.0, "position": 1.0, "size": 0.5}
    extra = right + [{"colour": "green", "shape": "triangle", "size": "small", "position": "left"}]
    assert image_check(truth, extra)["correct"] == 0.0
    wrong_shape = [dict(right[0], shape="circle"), right[1]]
    assert image_check(truth, wrong_shape)["correct"] == 0.0
    m = Metrics()
    m.add_image("t2i", image_check(truth, right))
    m.add_image("t2i", image_check(truth, extra), unseen=True)
    m.add_image("a2i", image_check(truth, right))
    m.add_caption(True)
    m.add_caption(False, unseen=True)
    m.add_refer(True, unseen=True)
    r = m.result()
    assert r["t2i_accuracy"] == 0.5 and r["a2i_accuracy"] == 1.0
    assert r["t2i_size_accuracy"] == pytest.approx((0.5 + 0.5) / 2)
    assert r["caption_accuracy"] == 0.5 and r["unseen"]["caption_accuracy"] == 0.0
    assert r["refer_accuracy"] == 1.0 and r["unseen"]["refer_accuracy"] == 1.0
    assert r["tts_wer"] is None and r["unseen"]["a2i_accuracy"] is None  # nothing measured: null, not 0
    assert set(r) == WORLD_KEYS and set(r["unseen"]) == WORLD_KEYS - {"unseen"}
    assert set(r["bits_per_token"]) == {"text", "image", "audio", "loc"}
    m.add_bits("image", nats=2 * math.log(2) * 10, tokens=10)
    assert m.result()["bits_per_token"]["image"] == pytest.approx(2.0)
    assert "caption_accuracy" in format_table(m.result())


# ---- the evaluator ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, "val", docs=48, seed=3, progress=False)
    return str(out / "val-*.tar")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(max_seq_len=512)


def test_eval_command_on_a_tiny_world(bundle, world, tmp_path, capsys):
    bdir = save_bundle_layout(bundle, tmp_path / "bundle")
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(bdir), "--data", world, "--out", str(out), "--limit", "2",
                 "--batch-size", "4"]) == 0
    r = json.loads(out.read_text())
    assert set(r) == WORLD_KEYS | {"by_objects", "by_aspect"}
    assert set(r["by_aspect"]) == {"square", "wide", "tall", "non_square"}
    for task in ("t2i", "a2i", "i2t", "ground", "refer"):  # every answer counts under one aspect
        n = {g: r["by_aspect"][g]["n"][task] for g in r["by_aspect"]}
        assert n["square"] + n["wide"] + n["tall"] == r["n"][task] and n["non_square"] == n["wide"] + n["tall"]
    assert 0.0 <= r["t2i_aspect_match"] <= 1.0
    printed = capsys.readouterr().out
    assert "grounding_acc50" in printed and "bits_per_token.text" in printed
    for task in ("t2i", "i2t", "ground", "refer", "asr", "tts", "a2i"):
        assert 1 <= r["n"][task] <= 2, (task, r["n"])
    for key in ("t2i_accuracy", "caption_accuracy", "grounding_acc50", "grounding_miou", "refer_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert r["asr_wer"] >= 0 and r["tts_wer"] >= 0
    # an untrained model is a uniform guess: about log2(V) bits for every modality
    for m, bpt in r["bits_per_token"].items():
        assert bpt == pytest.approx(math.log2(bundle.space.vocab_size), abs=0.3), m
    assert main(["eval", "--model", str(bdir), "--data", str(tmp_path / "none-*.tar"), "--out", str(out)]) == 2
    # one JSON line per generated answer, and the per-object-count accuracies agree with them
    examples_path = tmp_path / "examples.jsonl"
    assert main(["eval", "--model", str(bdir), "--data", world, "--out", str(out), "--limit", "2",
                 "--tasks", "t2i,i2t,ground", "--examples", str(examples_path)]) == 0
    r = json.loads(out.read_text())
    examples = [json.loads(x) for x in examples_path.read_text().splitlines()]
    assert sorted({e["task"] for e in examples}) == ["ground", "i2t", "t2i"]
    assert len(examples) == r["n"]["t2i"] + r["n"]["i2t"] + r["n"]["ground"]
    for e in examples:
        assert e["key"] and e["objects"] >= 1 and isinstance(e["correct"], bool)
        assert ("found" in e) if e["task"] == "t2i" else ("output" in e)
    t2i = [e for e in examples if e["task"] == "t2i"]
    for n, acc in r["by_objects"]["t2i"].items():
        sub = [e["correct"] for e in t2i if e["objects"] == int(n)]
        assert acc == pytest.approx(sum(sub) / len(sub))
    # a subset of the tasks, with greedy images: the others are null, not zero
    assert main(["eval", "--model", str(bdir), "--data", world, "--out", str(out), "--limit", "2",
                 "--tasks", "t2i,ground", "--temperature", "0", "--cfg", "image=1"]) == 0
    r = json.loads(out.read_text())
    assert r["n"]["t2i"] >= 1 and r["n"]["ground"] >= 1 and r["grounding_miou"] is not None
    assert r["n"]["i2t"] == 0 and r["caption_accuracy"] is None and r["asr_wer"] is None
    for bad in (["--tasks", "t2i,draw"], ["--temperature", "text=0.5"], ["--cfg", "text=2"], ["--cfg", "0"]):
        assert main(["eval", "--model", str(bdir), "--data", world, "--out", str(out), *bad]) == 2


class Oracle(torch.nn.Module):
    """Answers every prompt it was told about with the document's true continuation."""

    def __init__(self, model, answers: dict[tuple, list[int]]):
        super().__init__()
        self.cfg, self.answers = model.cfg, answers
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.rows: list[list[int]] = []

    def _logits(self):
        out = torch.zeros(len(self.rows), self.cfg.vocab_size)
        for i, fed in enumerate(self.rows):
            for n in range(len(fed), 0, -1):
                ans = self.answers.get(tuple(fed[:n]))
                if ans is not None and len(fed) - n < len(ans):
                    out[i, ans[len(fed) - n]] = 50.0
                    break
        return out

    def prefill(self, ids, cache, positions=None, attention_mask=None):
        valid = attention_mask if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        self.rows = [row[v].tolist() for row, v in zip(ids, valid)]
        return self._logits()

    def decode(self, ids, cache):
        for r, t in zip(self.rows, ids[:, 0].tolist()):
            r.append(t)
        return self._logits()

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.cfg.vocab_size)


def oracle_engine(ev: Evaluator, bundle, per_kind: dict, kinds, **engine_kw):
    """An engine whose model answers each document's prompt (of these kinds) with its true
    continuation; checks on the way that prompts are cut exactly like the documents."""
    answers = {}
    for kind in kinds:
        for d in per_kind[kind]:
            full, _ = bundle.stream.encode(ev.segments(d), bos=True, eos=True)
            prompt = ev.prompt(d)
            assert full[: len(prompt)].tolist() == prompt
            answers[tuple(prompt)] = full[len(prompt):].tolist()
    return Engine(Oracle(bundle.model, answers), bundle.space, **engine_kw)


def test_eval_scores_a_perfect_model_as_perfect(bundle, world):
    """With an oracle in place of the model, the text, box and transcript tasks score perfectly:
    prompts are cut and tokenized exactly like the documents, and the scoring reads them right."""
    ev = Evaluator(bundle, EvalOptions(limit=2, batch_size=3, progress=False))
    per_kind, _, _ = ev.read(world)
    ev.engine = oracle_engine(ev, bundle, per_kind, ("i2t", "ground", "refer", "asr"))
    ev.text_task("i2t", per_kind["i2t"])
    ev.text_task("refer", per_kind["refer"])
    ev.text_task("asr", per_kind["asr"])
    ev.ground_task(per_kind["ground"])
    r = ev.metrics.result()
    assert r["caption_accuracy"] == 1.0 and r["refer_accuracy"] == 1.0 and r["asr_wer"] == 0.0, (r["caption_accuracy"], r["refer_accuracy"], r["asr_wer"], r["n"])
    assert r["grounding_acc50"] == 1.0 and r["grounding_miou"] > 0.7  # boxes are quantized to 32 bins
    assert len(ev.examples) == sum(len(per_kind[k]) for k in ("i2t", "ground", "refer", "asr"))
    assert all(e["correct"] for e in ev.examples if e["task"] != "asr")
    assert all(set(acc.values()) == {1.0} for acc in by_objects(ev.examples).values())


def test_answers_that_cannot_fit_score_as_failures_and_are_counted(bundle, world):
    """A spoken prompt that leaves no room for its image: no crash, a miss, and a count."""
    ev = Evaluator(bundle, EvalOptions(limit=2, batch_size=2, progress=False))
    per_kind, _, _ = ev.read(world)
    docs = per_kind["a2i"]
    # one token short for each: not even the grid of the aspect asked for fits
    ev.engine.max_len = min(len(ev.prompt(d)) + ev.image_budget(d)[1] for d in docs) - 1
    ev.image_task("a2i", docs)
    r = ev.metrics.result()
    assert docs and r["a2i_accuracy"] == 0.0 and r["n"]["a2i"] == len(docs)
    assert ev.over_context == len(docs)



def test_a2i_answers_that_say_what_was_heard_are_written_then_drawn(bundle, tmp_path):
    """World `a2i_answer: transcript_image`: eval lets the model write the transcript first (up to
    its `<boi>`) and draws the image after what it wrote. An oracle model writes the true
    transcript, then an image follows it."""
    from anymodal.data.speech import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is not installed: no speech documents")
    generate_world(tmp_path, "val", docs=6, seed=3, progress=False,
                   overrides=["kinds={t2i: 0, i2t: 0, ground: 0, refer: 0, asr: 0, tts: 0, a2i: 1, story: 0, "
                              "prose: 0}", "a2i_answer=transcript_image", "speech_max_objects=1"])
    ev = Evaluator(bundle, EvalOptions(limit=3, batch_size=3, progress=False))
    per_kind, _, _ = ev.read(str(tmp_path / "val-*.tar"))
    docs = per_kind["a2i"]
    assert len(docs) == 3 and all("text" in d.segments[2] for d in docs)
    ev.engine = oracle_engine(ev, bundle, per_kind, ("a2i",))
    ev.image_task("a2i", docs)
    assert [e["said"] for e in ev.examples] == [d.meta["transcript"] for d in docs]
    assert all(e["grid"] is not None for e in ev.examples) and ev.metrics.result()["n"]["a2i"] == 3

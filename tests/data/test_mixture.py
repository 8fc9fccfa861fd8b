"""Data mixtures: config parsing, a mixture of one is the plain plan, weighted sources and kinds
realize their shares, token-space checks, exact loader resume, the realized-mix counter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anymodal.data.mixture import (
    DataSource,
    MixCounter,
    Mixture,
    Phase,
    check_kind_weights,
    format_plan,
    parse_phases,
    parse_sources,
    write_mix_json,
)
from anymodal.data.packing import EpochPlan, PackedLoader, TokenDataset, epoch_occurrences, plan_epoch
from anymodal.data.prepare import write_token_dataset
from anymodal.errors import ConfigError, UserError
from anymodal.tokenizers.stream import Audio, Image, Text

KINDS = ("t2i", "i2t", "tts", "prose")
CAPS = ["a small red circle at the top left", "there is a large blue square in the center",
        "a picture of a small green triangle at the right", "the orange square"]


def _docs(stream, n, seed, kinds=KINDS):
    """Documents of the given kinds (t2i and tts carry a conditioning span), lengths varying."""
    rng = np.random.default_rng(seed)
    sp = stream.space
    out = []
    for i in range(n):
        cap = CAPS[int(rng.integers(len(CAPS)))]
        kind = kinds[i % len(kinds)]
        img = Image(rng.integers(0, sp.image_codebook_size, size=sp.image_grid))
        aud = Audio(rng.integers(0, sp.audio_codebook_size, size=(int(rng.integers(2, 9)), sp.audio_n_q)))
        segs = {"t2i": [Text(cap), img], "i2t": [img, Text(cap)], "tts": [Text("say: " + cap), aud],
                "prose": [Text(cap + ". " + cap * int(rng.integers(1, 4)))]}[kind]
        ids, mod = stream.encode(segs)
        out.append((ids, mod, kind))
    return out


@pytest.fixture(scope="module")
def folders(stream, tmp_path_factory):
    """Two token folders of one token space: `a` (40 docs, all kinds) and `b` (24 docs, no prose)."""
    root = tmp_path_factory.mktemp("mix")
    write_token_dataset(root / "a", stream.space, _docs(stream, 40, 0), docs_per_shard=15)
    write_token_dataset(root / "b", stream.space, _docs(stream, 24, 1, kinds=("i2t", "t2i", "tts")))
    return root / "a", root / "b"


def _same_plan(p: EpochPlan, q: EpochPlan) -> None:
    for f in ("row_ptr", "doc", "start", "length", "drop"):
        np.testing.assert_array_equal(getattr(p, f), getattr(q, f), err_msg=f)


def _source_tokens(mix: Mixture, plan: EpochPlan) -> np.ndarray:
    return np.bincount(mix.source[plan.doc], weights=plan.length, minlength=len(mix.sources))


# ---- parsing -----------------------------------------------------------------------------------------
def test_parse_string_list_and_mappings():
    assert parse_sources("tok/a") == [DataSource("tok/a", 1.0, "a")]
    assert parse_sources("") == [] and parse_sources([]) == []
    assert [s.name for s in parse_sources(["tok/a", "other/b/"])] == ["a", "b"]
    got = parse_sources([{"path": "tok/a", "weight": 3}, {"path": "x/a", "weight": 1, "name": "a2"}, "tok/c"])
    assert got == [DataSource("tok/a", 3.0, "a"), DataSource("x/a", 1.0, "a2"), DataSource("tok/c", 1.0, "c")]
    assert parse_sources({"path": "tok/a", "weight": 2}) == [DataSource("tok/a", 2.0, "a")]
    assert parse_sources([{"path": "a", "weight": 0}, "b"])[0].weight == 0.0  # a source can be switched off
    assert check_kind_weights({"t2i": 2, "prose": 0}) == {"t2i": 2.0, "prose": 0.0}


def test_train_config_reads_the_command_line_forms(tmp_path):
    from anymodal.train.lm import load_train_config

    cfg = load_train_config("train/demo", ["data=[{path: tok/a, weight: 3}, {path: tok/b, weight: 1}]",
                                           "kind_weights={t2i: 2, prose: 0}", "kind_weights.asr=0.5"])
    assert [(s.path, s.weight, s.name) for s in parse_sources(cfg.data)] == [("tok/a", 3.0, "a"), ("tok/b", 1.0, "b")]
    assert cfg.kind_weights == {"t2i": 2.0, "prose": 0.0, "asr": 0.5}
    assert load_train_config("train/demo", ["data=tok/x"]).data == "tok/x"  # one folder, as always
    assert load_train_config("train/demo", ["data=[tok/x,tok/y]"]).data == ["tok/x", "tok/y"]


@pytest.mark.parametrize("value, match", [
    ("[{path: a, wieght: 3}]", "unknown key 'wieght'"),
    ("[{weight: 3}]", "needs 'path'"),
    ("[{path: a, weight: -1}]", r"data\[0\].weight"),
    ("[{path: a, weight: lots}]", r"data\[0\].weight"),
    ("[a, {path: b, weight: .nan}]", r"data\[1\].weight"),
    ("[{path: a, weight: 0}, {path: b, weight: 0}]", "positive sum"),
    ("[tok/a, other/a]", "named 'a'"),
    ("[{path: a, name: ''}]", "name"),
    ("[3]", r"data\[0\]"),
    ("[[a]]", r"data\[0\]"),
    ("5", "folder or a list"),
])
def test_malformed_sources_are_one_line_config_errors(value, match):
    from anymodal.train.lm import load_train_config

    with pytest.raises(ConfigError, match=match) as e:
        load_train_config("train/demo", [f"data={value}"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, match", [("kind_weights.t2i=-1", "kind_weights.t2i"),
                                             ("kind_weights.t2i=abc", "kind_weights.t2i"),
                                             ("kind_weights.t2i=.inf", "kind_weights.t2i")])
def test_bad_kind_weights_are_config_errors(override, match):
    from anymodal.train.lm import load_train_config

    with pytest.raises(ConfigError, match=match) as e:
        load_train_config("train/demo", [override])
    assert "\n" not in str(e.value)


# ---- one source is the plain plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed, epoch, dropout, shuffle", [(0, 0, 0.0, True), (7, 3, 0.5, True), (3, 1, 1.0, False)])
def test_one_source_without_weights_is_the_plain_plan(folders, seed, epoch, dropout, shuffle):
    a, _ = folders
    ds = TokenDataset(a)
    cond = np.where(ds.cond_end > ds.cond_start, ds.cond_end - ds.cond_start, 0)
    # the plain order: the generator's permutation, then dropout from its next draw (what runs
    # before mixtures existed saw, so their rows and resumes are unchanged)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(ds)) if shuffle else np.arange(len(ds))
    plain_drop = ((rng.random(len(ds)) < dropout) & (cond > 0))[perm]
    want = plan_epoch(ds.lengths, cond, 41, perm, plain_drop)
    # the same for a plain folder, a mixture of one, with a weight, and with kind weights that are all 1
    for data in (ds, Mixture([str(a)]), Mixture([DataSource(str(a), 5.0)]), Mixture([str(a)], {"t2i": 1.0})):
        np.testing.assert_array_equal(data.rates, 1.0)
        loader = PackedLoader(data, seq_len=40, seed=seed, cond_dropout=dropout, shuffle=shuffle)
        _same_plan(loader.plan(epoch), want)
    order, drop = epoch_occurrences(np.ones(len(ds)), cond, seed, epoch, dropout, shuffle)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(ds)) if shuffle else np.arange(len(ds))
    np.testing.assert_array_equal(order, perm)
    np.testing.assert_array_equal(drop, ((rng.random(len(ds)) < dropout) & (cond > 0))[perm])


def test_one_source_loader_batches_unchanged(folders):
    a, _ = folders
    old = PackedLoader(TokenDataset(a), seq_len=40, micro_batch=2, seed=4, cond_dropout=0.3)
    new = PackedLoader(Mixture([str(a)]), seq_len=40, micro_batch=2, seed=4, cond_dropout=0.3)
    for _ in range(40):  # several epochs
        x, y = next(old), next(new)
        for k in ("ids", "labels", "positions", "doc_ids", "modality"):
            assert torch.equal(x[k], y[k]), k
    assert old.epoch == new.epoch >= 1


# ---- the mixture as one document index ---------------------------------------------------------------
def test_documents_kinds_and_sources_read_through(folders):
    a, b = folders
    mix = Mixture([str(a), str(b)])
    da, db = TokenDataset(a), TokenDataset(b)
    assert len(mix) == len(da) + len(db) and mix.num_tokens == da.num_tokens + db.num_tokens
    assert mix.path == f"{a} + {b}" and mix.manifest == da.manifest
    for i in (0, 17, len(da) - 1, len(da), len(da) + 5, len(mix) - 1):
        src, j = (0, i) if i < len(da) else (1, i - len(da))
        ds = (da, db)[src]
        assert mix.locate(i) == (src, j) and mix.source[i] == src
        for drop in (False, True):
            got, want = mix.doc(i, drop), ds.doc(j, drop)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        assert mix.kind(i) == ds.kind(j)
        assert mix.lengths[i] == ds.lengths[j] and mix.cond_start[i] == ds.cond_start[j]
    assert set(mix.kind_names) == set(KINDS)


def test_weights_3_to_1_realize_token_shares(folders):
    a, b = folders
    mix = Mixture([DataSource(str(a), 3.0), DataSource(str(b), 1.0)])
    planned = mix.planned()
    assert planned["epoch_tokens"] == pytest.approx(mix.num_tokens)  # an epoch: as many tokens as both hold
    assert planned["source"]["a"]["share"] == 0.75
    assert planned["source"]["a"]["tokens_per_epoch"] == pytest.approx(0.75 * mix.num_tokens, abs=0.1)
    # a holds about 65% of the tokens: repeated to reach its 75%; b is thinned below one pass
    for name, share in (("a", 0.75), ("b", 0.25)):
        r = planned["source"][name]
        assert r["repeat"] == pytest.approx(share * mix.num_tokens / r["tokens"])
    assert planned["source"]["a"]["repeat"] > 1 > planned["source"]["b"]["repeat"]
    loader = PackedLoader(mix, seq_len=40, seed=2)
    per_epoch, total = [], np.zeros(2)
    for epoch in range(8):
        got = _source_tokens(mix, loader.plan(epoch))
        per_epoch.append(got.sum())
        total += got
    assert total[0] / total.sum() == pytest.approx(0.75, abs=0.02)
    assert np.mean(per_epoch) == pytest.approx(mix.num_tokens, rel=0.03)
    assert not np.array_equal(loader.plan(0).doc, loader.plan(1).doc)
    # repeated documents are whole occurrences: each piece set of an occurrence tiles its document
    plan = loader.plan(0)
    counts = np.bincount(plan.doc[plan.start == 0], minlength=len(mix))
    rates = mix.rates
    assert ((counts == np.floor(rates)) | (counts == np.floor(rates) + 1)).all()
    assert np.bincount(plan.doc, weights=plan.length, minlength=len(mix)) == pytest.approx(counts * mix.lengths)


def test_kind_weight_zero_removes_and_two_doubles(folders):
    a, b = folders
    mix = Mixture([str(a), str(b)], {"prose": 0, "t2i": 2})
    kid = {k: mix.kind_names.index(k) for k in mix.kind_names}
    in_a = mix.source == 0
    rate = {k: mix.rates[in_a & (mix.kinds == kid[k])] for k in KINDS}
    assert (rate["prose"] == 0).all()
    assert rate["t2i"].max() == pytest.approx(2 * rate["i2t"].max()) and np.ptp(rate["t2i"]) == 0
    assert rate["i2t"].max() == pytest.approx(rate["tts"].max())
    # each source still supplies its share of the epoch (weights 1:1: half each)
    for s in range(2):
        assert (mix.rates * mix.lengths)[mix.source == s].sum() == pytest.approx(mix.num_tokens / 2)
    loader = PackedLoader(mix, seq_len=40, seed=1)
    occ = np.zeros(len(mix))
    for epoch in range(12):
        plan = loader.plan(epoch)
        assert not (mix.kinds[plan.doc] == kid["prose"]).any()
        occ += np.bincount(plan.doc[plan.start == 0], minlength=len(mix))
    t2i = occ[in_a & (mix.kinds == kid["t2i"])].mean()
    i2t = occ[in_a & (mix.kinds == kid["i2t"])].mean()
    assert t2i / i2t == pytest.approx(2.0, rel=0.1)
    assert mix.planned()["kind"]["prose"]["tokens_per_epoch"] == 0 and "prose" in format_plan(mix.planned())


def test_bad_kind_weights_and_mixtures_are_refused(folders, stream, text_tokenizer, tmp_path):
    a, b = folders
    with pytest.raises(UserError, match="'story'.*no source holds"):
        Mixture([str(a), str(b)], {"story": 2})
    with pytest.raises(UserError, match="drop all of its documents"):  # b holds only these three kinds
        Mixture([str(a), str(b)], {"i2t": 0, "t2i": 0, "tts": 0})
    Mixture([DataSource(str(a)), DataSource(str(b), 0.0)], {"i2t": 0, "t2i": 0, "tts": 0})  # b is off anyway
    with pytest.raises(ConfigError, match="kind_weights.t2i"):
        Mixture([str(a)], {"t2i": -1})
    with pytest.raises(ConfigError, match="named 'a'"):
        Mixture([str(a), str(a)])
    with pytest.raises(UserError, match="not a token-shard folder"):
        Mixture([str(a), str(tmp_path / "nowhere")])
    # another token space (a bigger image codebook): refused, naming both folders
    from anymodal.tokenizers.token_space import TokenSpace

    other = TokenSpace.build(text_tokenizer, image_codebook_size=64, image_grid=(4, 4), audio_n_q=3,
                             audio_codebook_size=16, audio_frame_rate=25.0, audio_sample_rate=16000)
    write_token_dataset(tmp_path / "c", other, _docs(stream, 6, 2))
    with pytest.raises(UserError, match="token spaces disagree") as e:
        Mixture([str(a), str(tmp_path / "c")])
    assert str(a) in str(e.value) and str(tmp_path / "c") in str(e.value) and "\n" not in str(e.value)


# ---- curriculum phases ----------------------------------------------------------------------------------
def test_parse_phases():
    assert parse_phases(None) == [] and parse_phases([]) == []
    got = parse_phases([{"tokens": 2.5e3, "weights": {"b": 1}}, {"tokens": 100, "weights": {"a": 1, "b": 3},
                                                                   "kind_weights": {"t2i": 0}}])
    assert got == [Phase(2500, {"b": 1.0}), Phase(100, {"a": 1.0, "b": 3.0}, {"t2i": 0.0})]
    for bad, match in ((5, "list of phases"), ([{"tokens": 0, "weights": {"a": 1}}], r"phases\[0\].tokens"),
                       ([{"tokens": 10.5, "weights": {"a": 1}}], "whole number"),
                       ([{"tokens": 10, "weights": {"a": 0}}], "weight > 0"),
                       ([{"tokens": 10, "weights": {"a": -1}}], r"phases\[0\].weights.a"),
                       ([{"tokens": 10, "weights": {"a": 1}, "steps": 3}], "unknown key 'steps'"),
                       ([{"tokens": 10, "weights": {"a": 1}, "kind_weights": {"t2i": "x"}}],
                        r"phases\[0\].kind_weights.t2i")):
        with pytest.raises(ConfigError, match=match):
            parse_phases(bad)


def test_phases_come_first_with_their_own_weights_then_the_regular_epochs(folders):
    """Epoch 0 is the phase: about `tokens` tokens, only source b, t2i three times as often as in
    b's regular draw; from epoch 1 on, the regular mixture."""
    a, b = folders
    sources = [DataSource(str(a), 1.0), DataSource(str(b), 1.0)]
    plain = Mixture(sources)
    n_b = int(plain.lengths[plain.source == 1].sum())
    mix = Mixture(sources, {}, [Phase(2 * n_b, {"b": 1.0}, {"t2i": 3.0})])
    loader, ref = PackedLoader(mix, seq_len=40, seed=4), PackedLoader(plain, seq_len=40, seed=4)
    occ = np.zeros(len(mix))
    for seed in range(6):  # the phase's draw under six seeds, for the kind ratio
        order, _ = epoch_occurrences(mix.epoch_rates(0), loader.cond_len, seed=seed, epoch=0)
        occ += np.bincount(order, minlength=len(mix))
    phase = loader.plan(0)
    assert _source_tokens(mix, phase)[0] == 0
    assert phase.length.sum() == pytest.approx(2 * n_b, rel=0.1)
    kid = {k: mix.kind_names.index(k) for k in mix.kind_names}
    in_b = mix.source == 1
    t2i, i2t = (occ[in_b & (mix.kinds == kid[k])].mean() for k in ("t2i", "i2t"))
    assert t2i / i2t == pytest.approx(3.0, rel=0.15)
    for epoch in (1, 2):  # after the phase: the regular epochs, as the same mixture without one
        _same_plan(loader.plan(epoch), ref.plan(epoch))
    planned = mix.planned()["phases"][0]
    assert planned["tokens"] == 2 * n_b and planned["source_share"] == {"a": 0.0, "b": pytest.approx(1.0)}
    assert planned["kind_share"]["prose"] == 0.0 and "curriculum phase 1 (epoch 0)" in format_plan(mix.planned())
    # the iterator walks through the phase into the regular epochs
    epochs = [next(loader)["epoch"] for _ in range(400)]
    assert epochs[0] == 0 and 1 in epochs and epochs == sorted(epochs)
    with pytest.raises(UserError, match="names source 'c'"):
        Mixture(sources, {}, [Phase(100, {"c": 1.0})])
    with pytest.raises(UserError, match=r"phases\[0\].kind_weights names kind 'story'"):
        Mixture(sources, {}, [Phase(100, {"a": 1.0}, {"story": 1.0})])


def test_loader_resumes_inside_and_after_a_phase_and_refuses_another_curriculum(folders):
    a, b = folders

    def make(tokens=3000):
        mix = Mixture([DataSource(str(a)), DataSource(str(b))], {}, [Phase(tokens, {"b": 1.0}, {"t2i": 2.0})])
        return PackedLoader(mix, seq_len=40, micro_batch=2, grad_accum=2, seed=5, cond_dropout=0.3)

    for skip in (5, 60):  # inside the phase, then in a regular epoch after it
        first = make()
        for _ in range(skip):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
        expect = [next(first) for _ in range(10)]
        second = make()
        second.load_state_dict(state)
        for e in expect:
            got = next(second)
            assert torch.equal(got["ids"], e["ids"]) and got["epoch"] == e["epoch"]
    assert expect[-1]["epoch"] >= 1
    with pytest.raises(UserError, match="curriculum phases were"):
        make(tokens=4000).load_state_dict(state)
    plain = PackedLoader(Mixture([DataSource(str(a)), DataSource(str(b))]), seq_len=40, micro_batch=2, grad_accum=2,
                         seed=5, cond_dropout=0.3)
    with pytest.raises(UserError, match="curriculum phases were"):
        plain.load_state_dict(state)


# ---- loader state and the realized-mix counter --------------------------------------------------------------
def test_loader_state_restore_continues_exactly_with_a_mixture(folders):
    a, b = folders

    def make(weights=(3.0, 1.0), kinds=None):
        mix = Mixture([DataSource(str(a), weights[0]), DataSource(str(b), weights[1])], kinds or {"t2i": 2})
        return PackedLoader(mix, seq_len=40, micro_batch=2, grad_accum=2, seed=11, cond_dropout=0.5)

    first = make()
    for _ in range(30):  # into the second epoch
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint's meta.json holds it
    assert state["sources"][0]["share"] == 0.75 and state["kind_weights"] == {"t2i": 2.0}
    expect = [next(first) for _ in range(12)]
    second = make()
    second.load_state_dict(state)
    for e in expect:
        got = next(second)
        for k in ("ids", "labels", "positions", "doc_ids", "modality"):
            assert torch.equal(got[k], e[k]), k
    make(weights=(6.0, 2.0)).load_state_dict(state)  # the same shares: the same plan
    with pytest.raises(UserError, match="sources changed"):
        make(weights=(1.0, 1.0)).load_state_dict(state)
    with pytest.raises(UserError, match="kind_weights were"):
        make(kinds={"t2i": 3}).load_state_dict(state)
    with pytest.raises(UserError, match="cannot resume"):
        PackedLoader(Mixture([str(a)]), seq_len=40, micro_batch=2, grad_accum=2, seed=11,
                     cond_dropout=0.5).load_state_dict(state)


def test_counter_counts_global_rows_of_each_step(folders, tmp_path):
    """Two ranks: the counter of either, fed the step's global rows, equals the tokens both
    ranks' batches hold; label counts add up to what the batches label."""
    a, b = folders
    mix = Mixture([DataSource(str(a), 3.0, "world"), DataSource(str(b), 1.0)], {"prose": 0})
    ranks = [PackedLoader(mix, seq_len=40, micro_batch=2, rank=r, world_size=2, grad_accum=2, seed=3, cond_dropout=0.2)
             for r in range(2)]
    counters = [MixCounter(mix), MixCounter(mix)]
    want_src, want_labels = np.zeros(2, np.int64), dict.fromkeys(("text", "image", "audio", "loc"), 0)
    for _ in range(25):  # steps, across an epoch boundary
        for _ in range(2):  # grad_accum
            for loader in ranks:
                batch = next(loader)
                plan = loader.plan(batch["epoch"])
                for r in batch["rows"]:
                    lo, hi = plan.row_ptr[r], plan.row_ptr[r + 1]
                    np.add.at(want_src, mix.source[plan.doc[lo:hi]], plan.length[lo:hi])
                keep = batch["labels"] != -100
                for i, m in enumerate(want_labels):
                    want_labels[m] += int((keep & (batch["modality"] == i)).sum())
        for loader, counter in zip(ranks, counters):
            counter.add_rows(loader.plan(loader.epoch), loader.consumed - loader.global_batch, loader.consumed)
    counters[0].add_labels(want_labels)
    assert ranks[0].epoch >= 1
    rec = counters[0].record()
    assert rec["source"] == counters[1].record()["source"] == {"world": int(want_src[0]), "b": int(want_src[1])}
    assert sum(rec["kind"].values()) == counters[0].tokens == want_src.sum() and rec["kind"]["prose"] == 0
    assert rec["modality"] == want_labels
    restored = MixCounter(mix)
    restored.load_state_dict(json.loads(json.dumps(counters[0].state_dict())))
    assert restored.record() == rec
    write_mix_json(tmp_path / "data_mix.json", mix, counters[0], 25)
    out = json.loads((tmp_path / "data_mix.json").read_text())
    assert out["step"] == 25 and out["realized"]["tokens"] == want_src.sum()
    assert out["realized"]["source"] == rec["source"] and out["planned"]["source"]["world"]["share"] == 0.75
    assert sum(out["realized"]["share"]["source"].values()) == pytest.approx(1.0)
    assert not (tmp_path / "data_mix.json.tmp").exists()

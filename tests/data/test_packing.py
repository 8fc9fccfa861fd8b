"""Packing loader: row contents, masks and labels, determinism, rank split, exact resume, CFG dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anymodal.data.packing import IGNORE_INDEX, PackedLoader, TokenDataset, epoch_occurrences, plan_epoch
from anymodal.data.prepare import write_token_dataset
from anymodal.errors import UserError
from anymodal.tokenizers.stream import Audio, Box, Image, Text

CAPS = ["a small red circle at the top left", "there is a large blue square in the center",
        "a picture of a small green triangle at the right", "the orange square"]


def _docs(stream, n=40, seed=0):
    """Mixed documents of every modality, encoded by the real stream."""
    rng = np.random.default_rng(seed)
    sp = stream.space
    out = []
    for i in range(n):
        cap = CAPS[i % len(CAPS)]
        img = Image(rng.integers(0, sp.image_codebook_size, size=sp.image_grid))
        aud = Audio(rng.integers(0, sp.audio_codebook_size, size=(int(rng.integers(2, 9)), sp.audio_n_q)))
        kind = ["t2i", "i2t", "tts", "ground", "prose"][i % 5]
        segs = {"t2i": [Text(cap), img], "i2t": [img, Text(cap)], "tts": [Text("say: " + cap), aud],
                "ground": [img, Text("<ref>the red circle</ref>"), Box(0.1, 0.2, 0.5, 0.6)],
                "prose": [Text(cap + ". " + cap * int(rng.integers(1, 4)))]}[kind]
        ids, mod = stream.encode(segs)
        out.append((ids, mod, kind))
    return out


@pytest.fixture(scope="module")
def dataset(stream, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    docs = _docs(stream)
    write_token_dataset(path, stream.space, docs, docs_per_shard=15)
    return TokenDataset(path), docs


def test_dataset_reads_back_documents(dataset):
    ds, docs = dataset
    assert len(ds) == len(docs) and len(ds.manifest["shards"]) == 3
    for i, (ids, mod, kind) in enumerate(docs):
        got_ids, got_mod = ds.doc(i)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_mod, mod)
        assert ds.kind(i) == kind
        has_cond = kind in ("t2i", "tts")
        assert (ds.cond_end[i] > ds.cond_start[i]) == has_cond
        if has_cond:  # the span ends right before the generated span opens
            opener = ds.space.boi if kind == "t2i" else ds.space.boa
            assert ds.cond_start[i] == 1 and ids[ds.cond_end[i]] == opener


def _check_batch(ds, batch, loader):
    space = ds.space
    ids, labels, pos, doc, mod = (batch[k].numpy() for k in ("ids", "labels", "positions", "doc_ids", "modality"))
    plan = loader.plan(batch["epoch"])
    for b, r in enumerate(batch["rows"]):
        at = 0
        for k, p in enumerate(range(plan.row_ptr[r], plan.row_ptr[r + 1])):
            d, s, n = int(plan.doc[p]), int(plan.start[p]), int(plan.length[p])
            full, full_mod = ds.doc(d, drop_cond=bool(plan.drop[p]))
            seg = full[s : s + n]
            n_in = min(n, ids.shape[1] - at)
            np.testing.assert_array_equal(ids[b, at : at + n_in], seg[:n_in])
            assert (doc[b, at : at + n_in] == k).all()
            np.testing.assert_array_equal(pos[b, at : at + n_in], np.arange(n_in))
            # inside a piece every label is the next token, with its modality
            inner = min(n - 1, ids.shape[1] - at)
            np.testing.assert_array_equal(labels[b, at : at + inner], seg[1 : 1 + inner])
            np.testing.assert_array_equal(mod[b, at : at + inner], full_mod[s + 1 : s + 1 + inner])
            if at + n - 1 < ids.shape[1]:
                assert labels[b, at + n - 1] == IGNORE_INDEX  # last token of a piece predicts nothing
            at += n
        if at < ids.shape[1]:  # padding tail
            assert (ids[b, at:] == space.pad).all() and (labels[b, at:] == IGNORE_INDEX).all()
            assert (doc[b, at:] == plan.row_ptr[r + 1] - plan.row_ptr[r]).all()


def test_rows_masks_and_labels(dataset):
    ds, _ = dataset
    loader = PackedLoader(ds, seq_len=48, micro_batch=3, seed=1)
    for _ in range(6):
        batch = next(loader)
        assert batch["ids"].shape == (3, 48) and batch["ids"].dtype == torch.int64
        _check_batch(ds, batch, loader)


def test_every_token_once_per_epoch_and_long_docs_split(dataset):
    ds, _ = dataset
    row_len = 33  # shorter than several documents: they must be cut into pieces
    no_cond = np.zeros(len(ds), np.int64)
    order, drop = epoch_occurrences(ds.rates, no_cond, seed=3, epoch=0)
    plan = plan_epoch(ds.lengths, no_cond, row_len, order, drop)
    assert plan.length.max() <= row_len
    pieces: dict[int, list] = {d: [] for d in range(len(ds))}
    for d, s, n in zip(plan.doc, plan.start, plan.length):
        pieces[int(d)].append((int(s), int(n)))
    for d, ps in pieces.items():  # each document exactly once: its pieces tile it without gaps
        ps.sort()
        assert [s for s, _ in ps] == list(np.cumsum([0] + [n for _, n in ps[:-1]]))
        assert sum(n for _, n in ps) == ds.lengths[d]
    assert any(len(ps) > 1 for ps in pieces.values())
    fill = [plan.length[plan.row_ptr[r] : plan.row_ptr[r + 1]].sum() for r in range(plan.rows)]
    assert max(fill) <= row_len
    assert np.mean(fill) / row_len > 0.8  # look-ahead packing keeps padding low


def test_deterministic_and_epochs_differ(dataset):
    ds, _ = dataset
    a = PackedLoader(ds, seq_len=40, micro_batch=2, seed=7)
    b = PackedLoader(ds, seq_len=40, micro_batch=2, seed=7)
    for _ in range(30):  # crosses into the next epochs
        x, y = next(a), next(b)
        assert torch.equal(x["ids"], y["ids"]) and torch.equal(x["labels"], y["labels"])
    assert a.epoch >= 1
    p0, p1 = a.plan(0), a.plan(1)
    assert not np.array_equal(p0.doc, p1.doc)
    c = PackedLoader(ds, seq_len=40, micro_batch=2, seed=8)
    assert not np.array_equal(c.plan(0).doc, p0.doc)


def test_rank_split_matches_one_process(dataset):
    """Two ranks with micro-batch 1 see, step by step, the rows one process sees with grad_accum 2."""
    ds, _ = dataset
    one = PackedLoader(ds, seq_len=40, micro_batch=1, grad_accum=2, seed=5)
    ranks = [PackedLoader(ds, seq_len=40, micro_batch=1, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(25):
        single = [next(one)["ids"] for _ in range(2)]
        multi = [next(r)["ids"] for r in ranks]
        assert all(torch.equal(s, m) for s, m in zip(single, multi))
    assert one.epoch == ranks[0].epoch == ranks[1].epoch


def test_state_restore_continues_exactly(dataset):
    ds, _ = dataset
    a = PackedLoader(ds, seq_len=40, micro_batch=2, grad_accum=2, seed=11, cond_dropout=0.5)
    for _ in range(14):
        next(a)
    state = a.state_dict()
    expect = [next(a) for _ in range(12)]
    b = PackedLoader(ds, seq_len=40, micro_batch=2, grad_accum=2, seed=11, cond_dropout=0.5)
    b.load_state_dict(state)
    for e in expect:
        got = next(b)
        for k in ("ids", "labels", "positions", "doc_ids", "modality"):
            assert torch.equal(got[k], e[k]), k
    with pytest.raises(UserError):
        PackedLoader(ds, seq_len=41, micro_batch=2, grad_accum=2, seed=11, cond_dropout=0.5).load_state_dict(state)


def test_cond_dropout_removes_prompt(dataset):
    ds, docs = dataset
    space = ds.space
    loader = PackedLoader(ds, seq_len=64, micro_batch=1, seed=0, cond_dropout=1.0)
    plan = loader.plan(0)
    dropped = {int(d) for d, dr in zip(plan.doc, plan.drop) if dr}
    assert dropped == {i for i, (_, _, k) in enumerate(docs) if k in ("t2i", "tts")}
    for i in sorted(dropped)[:4]:
        ids, mod = ds.doc(i, drop_cond=True)
        full, _ = docs[i][0], docs[i][1]
        assert ids[0] == space.bos and ids[1] in (space.boi, space.boa)  # the span opens unconditionally
        assert len(ids) == len(full) - (ds.cond_end[i] - ds.cond_start[i])
        np.testing.assert_array_equal(ids[2:], full[ds.cond_end[i] + 1 :])
    none = PackedLoader(ds, seq_len=64, micro_batch=1, seed=0, cond_dropout=0.0)
    assert not none.plan(0).drop.any()
    # dropout draws its randomness after the shuffle: the document order does not change
    np.testing.assert_array_equal(np.unique(plan.doc, return_index=True)[1].size, len(ds))


def test_answer_marks_what_follows_the_prompt_of_t2i_and_tts_documents(dataset):
    ds, docs = dataset
    space = ds.space
    loader = PackedLoader(ds, seq_len=40, micro_batch=2, seed=3, cond_dropout=0.5)  # pieces, drops, both kinds
    plan = loader.plan(0)
    marked = 0
    for _ in range(plan.rows // 2):
        batch = next(loader)
        doc, ans = batch["doc_ids"].numpy(), batch["answer"].numpy()
        for b, r in enumerate(batch["rows"]):
            for k, p in enumerate(range(int(plan.row_ptr[r]), int(plan.row_ptr[r + 1]))):
                d, start = int(plan.doc[p]), int(plan.start[p])
                full, _ = ds.doc(d, drop_cond=bool(plan.drop[p]))
                where = doc[b] == k
                got = ans[b][where]
                if docs[d][2] not in ("t2i", "tts"):
                    assert not got.any()
                    continue
                opener = int(np.flatnonzero(np.isin(full, (space.boi, space.boa)))[0])  # the answer opens here
                np.testing.assert_array_equal(got, np.arange(start, start + len(got)) >= opener)
                marked += int(got.sum())
    assert marked > 0


def test_not_looping_stops_and_too_small_data_is_a_user_error(dataset):
    ds, _ = dataset
    once = PackedLoader(ds, seq_len=40, micro_batch=2, seed=0, shuffle=False, loop=False)
    n = sum(1 for _ in once)
    assert n == once.plan(0).rows // 2
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        next(PackedLoader(ds, seq_len=4000, micro_batch=8, seed=0))

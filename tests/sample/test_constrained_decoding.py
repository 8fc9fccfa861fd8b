"""Constrained decoding, sampling and the engine on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anymodal.sample.bundle import tiny_bundle
from anymodal.sample.constraints import AUDIO, BOX, DONE, IMAGE, TEXT, Constrainer
from anymodal.sample.engine import Engine, Request, cfg_mix
from anymodal.sample.sampling import ModalitySampling, filter_logits, make_generators, sample
from anymodal.tokenizers.stream import Audio, Box, Image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(max_seq_len=512)


class Biased(torch.nn.Module):
    """A model wrapper adding a fixed logit bias (makes a random model open spans often)."""

    def __init__(self, model, bias):
        super().__init__()
        self.inner, self.bias, self.cfg = model, bias, model.cfg

    def prefill(self, ids, cache, positions=None, attention_mask=None):
        return self.inner.prefill(ids, cache, positions=positions, attention_mask=attention_mask) + self.bias

    def decode(self, ids, cache):
        return self.inner.decode(ids, cache) + self.bias


def opener_bias(space, strength=4.0):
    bias = torch.zeros(space.vocab_size)
    bias[[space.boi, space.boa, space.box]] = strength
    bias[space.eos] = 1.0
    return bias


# ---- the state machine by hand ----------------------------------------------------------------------
def test_masks_follow_the_grammar(bundle):
    sp = bundle.space
    con = Constrainer(sp, max_audio_frames=3)
    st = con.initial(1)
    allowed = con.allowed(st)[0]
    # text: openers, eos and ordinary text yes; closers, loc, codes, pad/bos/unk no
    for ok in (sp.boi, sp.boa, sp.box, sp.eos, sp.ref, sp.eref, 200):
        assert allowed[ok]
    for bad in (sp.eoi, sp.eoa, sp.ebox, sp.pad, sp.bos, sp.unk, sp.loc_id(0), sp.image_id(0), sp.audio_id(0, 0),
                sp.vocab_size - 1):
        assert not allowed[bad]
    # image: exactly h*w codes then only <eoi>
    con.advance(st, torch.tensor([sp.boi]))
    assert int(st.mode[0]) == IMAGE
    lo, hi = sp.image_range()
    for _ in range(sp.image_tokens):
        a = con.allowed(st)[0]
        assert a[lo:hi].all() and int(a.sum()) == hi - lo
        con.advance(st, torch.tensor([lo + 3]))
    a = con.allowed(st)[0]
    assert a[sp.eoi] and int(a.sum()) == 1
    con.advance(st, torch.tensor([sp.eoi]))
    assert int(st.mode[0]) == TEXT
    # audio: level by level; <eoa> only at a frame boundary after >= 1 frame; forced after 3 frames
    con.advance(st, torch.tensor([sp.boa]))
    a = con.allowed(st)[0]
    assert not a[sp.eoa] and a[slice(*sp.audio_range(0))].all() and not a[slice(*sp.audio_range(1))].any()
    for frame in range(3):
        for lvl in range(sp.audio_n_q):
            a = con.allowed(st)[0]
            assert a[slice(*sp.audio_range(lvl))].all()
            assert int(a.sum()) == sp.audio_codebook_size + int(lvl == 0 and frame >= 1)
            con.advance(st, torch.tensor([sp.audio_id(lvl, 5)]))
    a = con.allowed(st)[0]
    assert a[sp.eoa] and int(a.sum()) == 1
    con.advance(st, torch.tensor([sp.eoa]))
    # box: x2 > x1, y2 > y1, then </box>
    con.advance(st, torch.tensor([sp.box]))
    assert int(st.mode[0]) == BOX
    a = con.allowed(st)[0]
    loc = a[slice(*sp.loc_range())]
    assert loc[: sp.loc_bins - 1].all() and not loc[-1] and int(a.sum()) == sp.loc_bins - 1
    con.advance(st, torch.tensor([sp.loc_id(10)]))
    con.advance(st, torch.tensor([sp.loc_id(4)]))
    loc = con.allowed(st)[0][slice(*sp.loc_range())]
    assert not loc[:11].any() and loc[11:].all()
    con.advance(st, torch.tensor([sp.loc_id(20)]))
    loc = con.allowed(st)[0][slice(*sp.loc_range())]
    assert not loc[:5].any() and loc[5:].all()
    con.advance(st, torch.tensor([sp.loc_id(6)]))
    a = con.allowed(st)[0]
    assert a[sp.ebox] and int(a.sum()) == 1
    con.advance(st, torch.tensor([sp.ebox]))
    con.advance(st, torch.tensor([sp.eos]))
    assert int(st.mode[0]) == DONE
    a = con.allowed(st)[0]
    assert a[sp.pad] and int(a.sum()) == 1


def test_prompt_state_and_room(bundle):
    sp = bundle.space
    con = Constrainer(sp)
    st = con.from_prompts([[sp.bos, 200, sp.boi, sp.image_id(1)], [sp.bos, sp.boa], [sp.bos, 200]])
    assert st.mode.tolist() == [IMAGE, AUDIO, TEXT]
    assert st.pos.tolist() == [1, 0, 0]
    # with 5 tokens left no image fits (needs h*w + 2 = 18) but a box (6) does not either; audio does
    a = con.allowed(st, remaining=torch.tensor([50, 50, 5]))[2]
    assert not a[sp.boi] and not a[sp.box] and a[sp.boa]
    a = con.allowed(st, remaining=torch.tensor([50, 50, 6]))[2]
    assert a[sp.box] and not a[sp.boi]


# ---- sampling -----------------------------------------------------------------------------------------
def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    out = filter_logits(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.65]))
    kept = torch.isfinite(out)
    # row 2: 0.4 + 0.3 = 0.7 >= 0.65, so 0.2 and 0.1 go
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert torch.equal(out[kept], logits[kept])


def test_top_k_alone_keeps_each_rows_k_largest():
    """The top-k-only path (no sort) keeps the same ids the sorting path keeps."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g)
    logits[3, 10:] = float("-inf")  # a constrained row with fewer allowed ids than k
    k = torch.tensor([1, 7, 0, 50, 300])
    out = filter_logits(logits, k, torch.ones(5))
    for row, kk in enumerate(k.tolist()):
        finite = torch.isfinite(logits[row])
        want = logits[row].topk(min(kk or 300, int(finite.sum()))).indices
        assert set(torch.isfinite(out[row]).nonzero()[:, 0].tolist()) == set(want.tolist()), row
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    mixed = filter_logits(logits[:2], k[:2], torch.tensor([1.0, 0.999]))  # a top-p row: the sort path
    assert torch.equal(torch.isfinite(mixed[0]), torch.isfinite(out[0]))


def test_sampling_greedy_topk1_and_seeds():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ones = torch.ones(4)
    g = make_generators([1, 2, 3, 4])
    greedy, _ = sample(logits, torch.zeros(4), torch.zeros(4, dtype=torch.long), ones, g)
    assert torch.equal(greedy, logits.argmax(-1))
    top1, _ = sample(logits, ones, torch.ones(4, dtype=torch.long), ones, make_generators([5, 6, 7, 8]))
    assert torch.equal(top1, greedy)
    a = [sample(logits, ones, torch.zeros(4, dtype=torch.long), ones, make_generators([9] * 4))[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    # the empirical distribution of T=1 samples matches softmax
    row = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    gen = make_generators([0])
    draws = [int(sample(row, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1), gen)[0]) for _ in range(3000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.04)
    # top-k alone (the fast candidate path): softmax renormalized over the k best, at temperature 0.5,
    # next to a greedy row and a row with a smaller k in the same batch
    rows = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    gen = make_generators([1, 2, 3])
    draws = torch.stack([sample(rows, [0.5, 0.0, 1.0], [2, 3, 1], [1.0, 1.0, 1.0], gen)[0] for _ in range(3000)])
    freq = np.bincount(draws[:, 0].numpy(), minlength=4) / len(draws)
    w = np.array([0.5, 0.3]) ** 2  # p^(1/T), T = 0.5, over the two best
    assert np.allclose(freq, [*(w / w.sum()), 0, 0], atol=0.03)
    assert (draws[:, 1] == 3).all() and (draws[:, 2] == 0).all()  # greedy row; k = 1 row
    # a row's draws depend on its own seed and parameters only, not on the rest of the batch
    logits = torch.randn(3, 40)
    g_alone, g_mixed = make_generators([7]), make_generators([7, 8, 9])
    alone = [int(sample(logits[:1], [1.0], [5], [1.0], g_alone)[0][0]) for _ in range(30)]
    mixed = [int(sample(logits, [1.0, 0.7, 0.0], [5, 0, 0], [1.0, 0.9, 1.0], g_mixed)[0][0]) for _ in range(30)]
    assert alone == mixed and len(set(alone)) > 1


# ---- the engine ------------------------------------------------------------------------------------------
def _check_well_formed(bundle, prompt, res, max_frames):
    sp = bundle.space
    dec = bundle.stream.decode(list(prompt) + res.tokens)
    assert not dec.problems, (dec.problems, res.tokens)
    kinds = set()
    for seg in dec.segments:
        if isinstance(seg, Image):
            assert seg.codes.shape == tuple(sp.image_grid)
            kinds.add("image")
        elif isinstance(seg, Audio):
            assert 1 <= seg.codes.shape[0] <= max_frames and seg.codes.shape[1] == sp.audio_n_q
            kinds.add("audio")
        elif isinstance(seg, Box):
            assert 0 <= seg.x1 < seg.x2 <= 1 and 0 <= seg.y1 < seg.y2 <= 1
            kinds.add("box")
    return kinds


def test_every_output_is_well_formed(bundle):
    sp = bundle.space
    model = Biased(bundle.model, opener_bias(sp))
    eng = Engine(model, sp, max_audio_frames=6)
    prompt = [sp.bos] + bundle.tok.text.encode("a small red circle")
    reqs = [Request(prompt, max_new_tokens=int(n), sampling=ModalitySampling.uniform(1.0), seed=s,
                    cfg_scale=(1.0, 2.5)[s % 2])
            for s, n in zip(range(24), np.random.default_rng(0).integers(8, 90, 24))]
    reqs += [Request(prompt, max_new_tokens=30, seed=100 + i, force=[f], stop_after_span=True)
             for i, f in enumerate((sp.boi, sp.boa, sp.box))]
    results = eng.generate(reqs)
    kinds = set()
    for r, res in zip(reqs, results):
        assert len(res.tokens) <= r.max_new_tokens and len(res.probs) == len(res.tokens)
        kinds |= _check_well_formed(bundle, r.prompt, res, 6)
        if res.finish == "eos":
            assert res.tokens[-1] == sp.eos
    assert kinds == {"image", "audio", "box"}
    assert {r.finish for r in results} >= {"eos", "span"}
    forced = results[-3:]
    assert [f.tokens[0] for f in forced] == [sp.boi, sp.boa, sp.box]
    assert forced[0].tokens[-1] == sp.eoi and len(forced[0].tokens) == sp.image_tokens + 2
    assert forced[2].tokens[-1] == sp.ebox and len(forced[2].tokens) == 6
    assert all(f.finish == "span" for f in forced)


def test_stop_ids_end_a_row_after_the_id(bundle):
    sp = bundle.space
    eng = Engine(Biased(bundle.model, opener_bias(sp, 2.0)), sp)
    prompt = [sp.bos] + bundle.tok.text.encode("there is")
    free = eng.generate([Request(prompt, 40, ModalitySampling.uniform(1.0), seed=5)])[0]
    stop = next(t for t in free.tokens[3:] if t != sp.eos)  # an id the free run emits, not first
    cut = eng.generate([Request(prompt, 40, ModalitySampling.uniform(1.0), seed=5, stop_ids=[stop])])[0]
    k = free.tokens.index(stop)
    assert cut.tokens == free.tokens[: k + 1] and cut.finish == "stop"  # same path, ended on the id


def test_stop_reasons_in_order_and_forced_ids_obey_the_grammar(bundle):
    """When a token meets several stop conditions the first of eos, span, stop id, length names it;
    a forced id the grammar does not allow is an error."""
    sp = bundle.space
    eng = Engine(bundle.model, sp)
    prompt = [sp.bos] + bundle.tok.text.encode("there is")
    image = sp.image_tokens + 2  # <boi> codes <eoi>
    reqs = [
        Request(prompt, 1, force=[sp.eos], stop_ids=[sp.eos]),  # eos, also a stop id and the budget
        Request(prompt, image, force=[sp.boi], stop_after_span=True, stop_ids=[sp.eoi]),  # span, stop, length
        Request(prompt, image, force=[sp.boi], stop_ids=[sp.eoi]),  # stop id and length
        Request(prompt, image, force=[sp.boi]),  # length
    ]
    res = eng.generate(reqs)
    assert [r.finish for r in res] == ["eos", "span", "stop", "length"]
    assert res[0].tokens == [sp.eos] and all(r.tokens[-1] == sp.eoi for r in res[1:])
    with pytest.raises(ValueError, match="forced token .* is not allowed at step 1 of request 0"):
        eng.generate([Request(prompt, image, force=[sp.boi, sp.eoi])])  # an image cannot close before its codes


def test_seeds_reproduce_and_rows_are_independent(bundle):
    sp = bundle.space
    eng = Engine(Biased(bundle.model, opener_bias(sp, 2.0)), sp)
    prompt = [sp.bos] + bundle.tok.text.encode("there is")
    reqs = [Request(prompt, 40, ModalitySampling.uniform(1.0), seed=s) for s in (3, 4)]
    a, b = eng.generate(reqs), eng.generate(reqs)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert a[0].tokens != a[1].tokens
    # the same request alone and beside a longer prompt (left padding) gives the same tokens
    other = Request([sp.bos] + bundle.tok.text.encode("a picture of a small purple square at the left"), 40,
                    ModalitySampling.uniform(1.0), seed=11)
    alone = eng.generate([reqs[0]])[0]
    mixed = eng.generate([other, reqs[0]])[1]
    assert alone.tokens == mixed.tokens


def test_cfg_scale_one_is_the_conditional_branch(bundle):
    sp = bundle.space
    eng = Engine(bundle.model, sp)
    prompt = [sp.bos] + bundle.tok.text.encode("a large green triangle")
    reqs = [Request(prompt, 30, ModalitySampling.uniform(1.0), seed=s, force=[sp.boi], stop_after_span=True)
            for s in (1, 2)]
    plain = eng.generate(reqs)
    with_rows = eng.generate(reqs, cfg_rows="always")  # unconditional rows present, scale 1
    # Same tokens; probabilities agree to float noise (a bigger batch takes other matmul kernels).
    assert [r.tokens for r in plain] == [r.tokens for r in with_rows]
    assert np.allclose(sum((r.probs for r in plain), []), sum((r.probs for r in with_rows), []), rtol=1e-4)
    # The mixing itself is exact at scale 1, and u + s(c - u) otherwise.
    c, u = torch.randn(3, 40), torch.randn(3, 40)
    assert torch.equal(cfg_mix(c, u, torch.ones(3, 1)), c)
    assert torch.allclose(cfg_mix(c, u, 3.0), u + 3.0 * (c - u), atol=1e-5)
    guided = eng.generate([Request(prompt, 30, ModalitySampling.uniform(1.0), seed=1, force=[sp.boi],
                                   stop_after_span=True, cfg_scale=4.0)])
    # guidance reshapes the image-code distribution (a random model's branches differ only a little)
    assert not np.allclose(guided[0].probs[1:17], plain[0].probs[1:17], rtol=1e-3)


class Spy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner, self.cfg, self.steps = model, model.cfg, []

    def prefill(self, ids, cache, positions=None, attention_mask=None):
        out = self.inner.prefill(ids, cache, positions=positions, attention_mask=attention_mask)
        self.steps.append((ids[:, -1:].clone(), out.clone()))
        return out

    def decode(self, ids, cache):
        out = self.inner.decode(ids, cache)
        self.steps.append((ids.clone(), out.clone()))
        return out


def test_unconditional_branch_sees_only_the_open_span(bundle):
    """The CFG row's logits equal a fresh forward on `<s> <boi> c_1..c_k` (and again for a 2nd span)."""
    sp = bundle.space
    spy = Spy(Biased(bundle.model, opener_bias(sp, 6.0)))
    eng = Engine(spy, sp, max_audio_frames=2)
    prompt = [sp.bos] + bundle.tok.text.encode("a small red circle at the top left")
    req = Request(prompt, 120, ModalitySampling.uniform(1.0), seed=5, cfg_scale=3.0)
    res = eng.generate([req])[0]
    bias = opener_bias(sp, 6.0)
    toks = res.tokens
    spans = 0
    for t in range(len(toks) - 1):
        # the uncond row's logits after feeding toks[t] (step t+1 in spy.steps)
        if res.modes[t + 1] not in (IMAGE, AUDIO):
            continue
        start = max(i for i in range(t + 1) if toks[i] in (sp.boi, sp.boa))
        ctx = torch.tensor([[sp.bos] + toks[start: t + 1]])
        want = bundle.model(ctx)[0, -1] + bias
        got = spy.steps[t + 1][1][1]
        assert torch.allclose(got, want, atol=1e-4), (t, (got - want).abs().max())
        spans += toks[t] in (sp.boi, sp.boa)
    assert spans >= 2, toks

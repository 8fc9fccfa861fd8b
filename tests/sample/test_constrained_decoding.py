"""Constrained decoding, sampling and the engine on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anymodal.sample.bundle import tiny_bundle
from anymodal.sample.constraints import AUDIO, BOX, DONE, IMAGE, TEXT, Constrainer
from anymodal.sample.engine import Engine, Request, cfg_mix
from anymodal.sample.sampling import ModalitySampling, filter_logits, make_generators, sample
from anymodal.tokenizers import Stream, build_space
from anymodal.tokenizers.stream import Audio, Box, Image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(max_seq_len=512)


@pytest.fixture(scope="module")
def space_v1(bundle):
    """The square layout of version-1 token spaces over the same tokenizers (its ids are a prefix of
    version 2's, so the same model serves both)."""
    t = bundle.tok
    return build_space(t.text, t.image, t.audio, version=1)


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
def test_masks_follow_the_grammar(space_v1):
    """Version 1 (square images) exactly as before the any-aspect layout."""
    sp = space_v1
    assert not sp.any_aspect
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


def test_prompt_state_and_room(space_v1):
    sp = space_v1
    con = Constrainer(sp)
    st = con.from_prompts([[sp.bos, 200, sp.boi, sp.image_id(1)], [sp.bos, sp.boa], [sp.bos, 200]])
    assert st.mode.tolist() == [IMAGE, AUDIO, TEXT]
    assert st.pos.tolist() == [1, 0, 0]
    # with 5 tokens left no image fits (needs h*w + 2 = 18) but a box (6) does not either; audio does
    a = con.allowed(st, remaining=torch.tensor([50, 50, 5]))[2]
    assert not a[sp.boi] and not a[sp.box] and a[sp.boa]
    a = con.allowed(st, remaining=torch.tensor([50, 50, 6]))[2]
    assert a[sp.box] and not a[sp.boi]


def _only(allowed_row: torch.Tensor) -> list[int]:
    return allowed_row.nonzero()[:, 0].tolist()


def test_a_stated_grid_gives_w_codes_per_row_and_h_rows(bundle):
    """Prompts ending in `<boi> <size_h> <size_w>` (three grids in one batch, one beyond the model's
    own budget of 16 codes): exactly w codes, a forced `<eor>`, h times, then a forced `<eoi>`."""
    sp = bundle.space
    con = Constrainer(sp)
    grids = [(2, 5), (3, 1), (3, 7)]
    st = con.from_prompts([[sp.bos, 200, sp.boi, sp.size_id(h), sp.size_id(w)] for h, w in grids])
    assert st.mode.tolist() == [IMAGE] * 3 and st.grid.tolist() == [list(g) for g in grids]
    lo, hi = sp.image_range()
    seen = [[] for _ in grids]
    for _ in range(max(h * (w + 1) + 1 for h, w in grids)):
        a = con.allowed(st)
        tok = []
        for b in range(len(grids)):
            ids = _only(a[b])
            if int(st.mode[b]) == TEXT:  # this row's image is done: feed text
                tok.append(200)
                continue
            assert ids in (list(range(lo, hi)), [sp.eor], [sp.eoi]), ids
            seen[b].append("c" if ids[0] == lo else {sp.eor: "r", sp.eoi: "e"}[ids[0]])
            tok.append(lo + b if ids[0] == lo else ids[0])
        con.advance(st, torch.tensor(tok))
    for (h, w), kinds in zip(grids, seen):
        assert "".join(kinds) == ("c" * w + "r") * h + "e"
    assert st.mode.tolist() == [TEXT] * 3


def test_the_models_grid_respects_its_token_budget(bundle):
    """After `<boi>` only sizes: h <= max_image_tokens (and <= the side limit), then w with h*w within it."""
    sp = bundle.space
    size = lambda ids: [i - sp.size_range()[0] + 1 for i in ids]  # noqa: E731
    for budget in (16, 12, 200):
        con = Constrainer(sp, max_image_tokens=budget)
        st = con.from_prompts([[sp.bos, sp.boi]])
        assert size(_only(con.allowed(st)[0])) == list(range(1, min(budget, sp.image_max_side) + 1))
        for h in (1, 3, 5, min(budget, 64)):
            s2 = con.from_prompts([[sp.bos, sp.boi, sp.size_id(h)]])
            want = max(1, min(sp.image_max_side, budget // h))
            assert size(_only(con.allowed(s2)[0])) == list(range(1, want + 1)), (budget, h)
    # a prompt may state an h beyond the budget: w = 1 is left
    con = Constrainer(sp)
    st = con.from_prompts([[sp.bos, sp.boi, sp.size_id(40)]])
    assert size(_only(con.allowed(st)[0])) == [1]
    # the default budget is the space's square grid
    assert Constrainer(sp).max_image_tokens == sp.image_tokens == 16
    assert con.image_open == sp.image_max_span(16) == 4 + 16 * 2  # the tallest: 16 rows of one code


def test_v2_prompt_state_and_room(bundle):
    sp = bundle.space
    con = Constrainer(sp)
    st = con.from_prompts([[sp.bos, 200, sp.boi, sp.size_id(2), sp.size_id(3), sp.image_id(1)],
                           [sp.bos, sp.boi, sp.image_id(1)],  # a square-layout image: not an image here
                           [sp.bos, sp.boi, sp.size_id(2)], [sp.bos, 200]])
    assert st.mode.tolist() == [IMAGE, TEXT, IMAGE, TEXT] and st.pos.tolist() == [3, 0, 1, 0]
    assert st.grid[0].tolist() == [2, 3] and int(st.grid[2, 0]) == 2
    # <boi> opens only when the longest grid the model may choose fits (16 x 1: 36 tokens here)
    a = con.allowed(st, remaining=torch.tensor([50, 50, 50, 35]))[3]
    assert not a[sp.boi] and a[sp.boa]
    assert con.allowed(st, remaining=torch.tensor([50, 50, 50, 36]))[3][sp.boi]
    # an image already open (a prompt ending in <boi>) gets a grid that fits the budget
    size = lambda ids: [i - sp.size_range()[0] + 1 for i in ids]  # noqa: E731
    st = con.from_prompts([[sp.bos, sp.boi], [sp.bos, sp.boi, sp.size_id(4)], [sp.bos, sp.boi, sp.size_id(3)]])
    a = con.allowed(st, remaining=torch.tensor([12, 15, 3]))
    assert size(_only(a[0])) == [1, 2, 3, 4]  # 3 + 2h <= 12
    assert size(_only(a[1])) == [1, 2]  # 2 + 4(w + 1) <= 15
    assert size(_only(a[2])) == [1]  # nothing fits: the smallest, cut by the budget


@pytest.mark.parametrize("version", [2, 1])
def test_random_logits_never_break_the_format(bundle, space_v1, version):
    """Any logits, any budget: every image decodes with its stated grid (within the budget of the
    model's own choice), rows of w codes, h rows; so do clips and boxes. Version 1: the square."""
    sp = bundle.space if version == 2 else space_v1
    stream = Stream(sp, bundle.tok.text)
    con = Constrainer(sp, max_audio_frames=4, max_image_tokens=12)
    B = 12
    stated = [sp.boi, sp.size_id(5), sp.size_id(2)] if version == 2 else [sp.boi, sp.image_id(1), sp.image_id(2)]
    prompts = [[sp.bos, 200], [sp.bos, sp.boi], [sp.bos, *stated]] * (B // 3)
    shapes = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        budget = torch.randint(5, 80, (B,), generator=g)
        budget[2::3] = budget[2::3].clamp_min(5 * 3 + 1)  # a stated 5 x 2 grid needs its rows and <eoi>
        if version == 1:  # a square image the prompt opened needs all its codes and <eoi>
            budget[1::3] = budget[1::3].clamp_min(sp.image_tokens + 1)
        st = con.from_prompts(prompts)
        out = [[] for _ in range(B)]
        for step in range(int(budget.max())):
            live = torch.tensor([step < int(n) and sp.eos not in o for n, o in zip(budget, out)])
            logits = torch.randn(B, sp.vocab_size, generator=g) * 3
            logits[:, [sp.boi, sp.boa, sp.box]] += 4.0
            logits[:, [sp.eor, sp.eoi]] += 6.0  # a model that would end rows or images early
            rem = (budget - step).clamp_min(1)
            tok = con.apply(logits, st, rem).argmax(-1)
            con.advance(st, tok, active=live)
            for b in range(B):
                if live[b]:
                    out[b].append(int(tok[b]))
        for b in range(B):
            dec = stream.decode(prompts[b] + out[b])
            assert not dec.problems, (seed, b, dec.problems)
            for seg in dec.segments:
                if isinstance(seg, Image):
                    h, w = seg.codes.shape
                    shapes.add((h, w))
                    assert (h, w) == (5, 2) or h * w <= 12 if version == 2 else (h, w) == tuple(sp.image_grid)
    assert len(shapes) >= 5 if version == 2 else shapes == {tuple(sp.image_grid)}


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
            h, w = seg.codes.shape
            assert h * w <= sp.image_tokens and max(h, w) <= sp.image_max_side  # the model's own grid
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
    reqs += [Request(prompt, max_new_tokens=40, seed=100 + i, force=[f], stop_after_span=True)
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
    grid = bundle.stream.decode(forced[0].tokens).segments[0].codes.shape
    assert forced[0].tokens[-1] == sp.eoi and len(forced[0].tokens) == sp.image_span(*grid)
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
    image = sp.image_span(4, 3)  # <boi> <size_4> <size_3> 4 x (3 codes <eor>) <eoi>
    grid = [sp.boi, sp.size_id(4), sp.size_id(3)]
    reqs = [
        Request(prompt, 1, force=[sp.eos], stop_ids=[sp.eos]),  # eos, also a stop id and the budget
        Request(prompt, image, force=grid, stop_after_span=True, stop_ids=[sp.eoi]),  # span, stop, length
        Request(prompt, image, force=grid, stop_ids=[sp.eoi]),  # stop id and length
        Request(prompt, image, force=grid),  # length
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


def test_cfg_rows_follow_each_requests_grid(bundle):
    """Guided requests with different grids in one batch (one stated by its prompt, one forced, one the
    model's choice): each unconditional row sees `<s> <boi> <size_h> <size_w> codes…` of its own
    partner, size tokens included, and every image has its partner's rows."""
    sp = bundle.space
    spy = Spy(bundle.model)
    eng = Engine(spy, sp)
    text = [sp.bos] + bundle.tok.text.encode("a small red circle")
    reqs = [Request(text + [sp.boi, sp.size_id(2), sp.size_id(6)], 40, ModalitySampling.uniform(1.0), seed=1,
                    cfg_scale=3.0, stop_after_span=True),
            Request(text, 40, ModalitySampling.uniform(1.0), seed=2, cfg_scale=2.0, stop_after_span=True,
                    force=[sp.boi, sp.size_id(5), sp.size_id(1)]),
            Request(text, 40, ModalitySampling.uniform(1.0), seed=3, cfg_scale=4.0, stop_after_span=True,
                    force=[sp.boi])]
    res = eng.generate(reqs)
    grids = [bundle.stream.decode(([sp.boi, sp.size_id(2), sp.size_id(6)] if i == 0 else []) + r.tokens)
             .segments[0].codes.shape for i, r in enumerate(res)]
    assert grids[:2] == [(2, 6), (5, 1)] and grids[2][0] * grids[2][1] <= sp.image_tokens
    assert all(r.finish == "span" and r.tokens[-1] == sp.eoi for r in res)
    for j, r in enumerate(res):
        span = ([sp.boi, sp.size_id(2), sp.size_id(6)] if j == 0 else []) + r.tokens
        first = 3 if j == 0 else 0  # generated tokens before the first the uncond row follows
        for t in range(len(r.tokens) - 1):
            # uncond row 3 + j after feeding r.tokens[t]: a fresh pass over <s> and the span so far
            ctx = torch.tensor([[sp.bos] + span[: first + t + 1]])
            got = spy.steps[t + 1][1][3 + j]
            torch.testing.assert_close(got, bundle.model(ctx)[0, -1], atol=1e-4, rtol=0)

"""The native decode step computes what Transformer.decode computes, and the engine falls back to
`model.decode` wherever the step does not apply (same tokens either way)."""

from __future__ import annotations

import shutil

import pytest
import torch

from anymodal.kernels import decode as native
from anymodal.kernels.decode import MAX_BATCH, NativeDecoder
from anymodal.model import ModelConfig, Transformer
from anymodal.model.kv_cache import KVCache
from anymodal.sample.bundle import tiny_bundle
from anymodal.sample.constraints import AUDIO, BOX, DONE, IMAGE, TEXT, Constrainer
from anymodal.sample.engine import Engine, Request
from anymodal.sample.sampling import ModalitySampling

pytestmark = pytest.mark.usefixtures("one_thread")


HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def needs_kernel():
    if native.load() is None:
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the native kernel cannot be built here")
def test_native_kernel_builds_and_loads():
    assert native.load() is not None, native.unavailable_reason()


@pytest.mark.parametrize("placement,kv_heads", [("pre", 4), ("swin", 2)])
def test_native_step_matches_model_decode(placement, kv_heads):
    needs_kernel()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=kv_heads, norm_placement=placement,
                      init_std=0.1, max_seq_len=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a permutation mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    dec = NativeDecoder.load(model)
    assert dec is not None
    # Left-padded prompts of different lengths, as the engine builds them.
    ids = torch.randint(4, 128, (3, 9))
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, :4] = False
    valid[2, :7] = False
    ids[~valid] = 0
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    caches = [KVCache.empty(cfg, 3, 30) for _ in range(2)]
    ref = [model.prefill(ids, caches[0], positions=pos, attention_mask=valid)]
    got = [model.prefill(ids, caches[1], positions=pos, attention_mask=valid)]
    assert NativeDecoder.applies(caches[1])
    tok = ref[0].argmax(-1, keepdim=True)
    with torch.inference_mode():  # as in the engine
        for step in range(12):
            ref.append(model.decode(tok, caches[0]))
            got.append(dec.step(tok, caches[1]))
            if step == 5:  # a CFG-style edit: row 2 forgets two slots and rewinds its position
                for c in caches:
                    c.valid[2, 9:11] = False
                    c.next_pos[2] -= 2
            tok = ref[-1].argmax(-1, keepdim=True)
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), atol=2e-5, rtol=1e-5)
    assert torch.equal(caches[0].next_pos, caches[1].next_pos) and caches[0].length == caches[1].length
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=2e-5, rtol=1e-5)


def _requests(b):
    sp = b.space
    return [Request([sp.bos] + b.tok.text.encode(t), 40, ModalitySampling.uniform(1.0, top_k=20), seed=i,
                    cfg_scale=(1.0, 3.0)[i % 2], force=[sp.boi] if i == 1 else ())
            for i, t in enumerate(["a small red circle", "there is", "say: hello"])]


def test_engine_native_and_model_decode_agree():
    needs_kernel()
    b = tiny_bundle(max_seq_len=256)
    reqs = _requests(b)
    fast = Engine(b.model, b.space)
    plain = Engine(b.model, b.space, native=False)
    assert fast.native is not None and plain.native is None
    for r1, r2 in zip(fast.generate(reqs), plain.generate(reqs)):
        assert r1.tokens == r2.tokens
        assert torch.allclose(torch.tensor(r1.probs), torch.tensor(r2.probs), atol=1e-4)


def test_falls_back_to_model_decode(monkeypatch):
    """ANYMODAL_NATIVE=0, another dtype, a model without the Transformer layout or training mode:
    no native step; a batch over MAX_BATCH rows: the step does not apply to its cache."""
    b = tiny_bundle(max_seq_len=256)
    cfg = b.model.cfg
    assert not NativeDecoder.applies(KVCache.empty(cfg, MAX_BATCH + 1, 4))
    assert not NativeDecoder.applies(KVCache.empty(cfg, 1, 4, dtype=torch.bfloat16))

    class Wrapped(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.cfg = model, model.cfg

        def prefill(self, ids, cache, positions=None, attention_mask=None):
            return self.inner.prefill(ids, cache, positions=positions, attention_mask=attention_mask)

        def decode(self, ids, cache):
            return self.inner.decode(ids, cache)

    assert NativeDecoder.load(Wrapped(b.model)) is None
    assert NativeDecoder.load(Transformer(cfg).train()) is None
    assert NativeDecoder.load(Transformer(cfg).eval().to(torch.bfloat16)) is None
    reqs = _requests(b)
    want = [r.tokens for r in Engine(Wrapped(b.model), b.space).generate(reqs)]
    monkeypatch.setenv("ANYMODAL_NATIVE", "0")
    assert native.load() is None and "ANYMODAL_NATIVE=0" in native.unavailable_reason()
    off = Engine(b.model, b.space)
    assert off.native is None
    assert [r.tokens for r in off.generate(reqs)] == want


def test_native_step_same_for_any_thread_count():
    """Each output sums its products in the same order whatever the column split: bit-identical."""
    needs_kernel()
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Transformer(cfg).eval()
    dec = NativeDecoder.load(model)
    ids = torch.randint(4, 300, (2, 5))
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cache = KVCache.empty(cfg, 2, 16)  # every token through the native step (no prefill GEMM)
        outs.append(torch.stack([dec.step(ids[:, i:i + 1], cache) for i in range(5)]))
    torch.set_num_threads(1)
    assert torch.equal(outs[0], outs[1])


def test_vocab_slice_computes_only_that_slice():
    needs_kernel()
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=200, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    model = Transformer(cfg).eval()
    dec = NativeDecoder.load(model)
    ids = torch.randint(4, 200, (3, 4))
    caches = [KVCache.empty(cfg, 3, 8) for _ in range(2)]
    for c in caches:
        model.prefill(ids, c)
    nxt = torch.tensor([[5], [6], [7]])
    full = dec.step(nxt, caches[0])
    part = dec.step(nxt, caches[1], (37, 121))
    torch.testing.assert_close(part[:, 37:121], full[:, 37:121], atol=1e-6, rtol=1e-6)
    assert torch.isneginf(part[:, :37]).all() and torch.isneginf(part[:, 121:]).all()
    torch.testing.assert_close(caches[1].k, caches[0].k)  # the cache step is the same either way
    with pytest.raises(ValueError, match="bad vocabulary slice"):
        dec.step(nxt, caches[1], (121, 37))


def test_vocab_spans_cover_every_allowed_id():
    """The decoder computes logits only inside the span of the rows' states: nothing allowed lies outside."""
    b = tiny_bundle(max_seq_len=64)
    sp = b.space
    con = Constrainer(sp)
    states = [(mode, pos, (0, 0)) for mode in (TEXT, AUDIO, BOX, DONE) for pos in range(con.max_pos + 3)]
    # version-2 images: the sizes, then codes, row ends and <eoi> of a few grids
    states += [(IMAGE, pos, grid) for grid in ((1, 1), (2, 3), (4, 4), (5, 1))
               for pos in range(grid[0] * (grid[1] + 1) + 3)]
    for mode, pos, grid in states:
        st = con.initial(1)
        st.mode[0], st.pos[0] = mode, pos
        st.grid[0] = torch.tensor(grid)
        lo, hi = con.vocab_span(con.row_index(st), remaining=10_000)
        allowed = con.allowed(st).nonzero()[:, 1]
        assert lo <= int(allowed.min()) and int(allowed.max()) < hi, (mode, pos)
        # near the end of the budget the mask can change (audio is closed): whole vocabulary
        st_end = con.allowed(st, torch.tensor([con.n_q])).nonzero()[:, 1]
        lo2, hi2 = con.vocab_span(con.row_index(st), remaining=con.n_q)
        assert lo2 <= int(st_end.min()) and int(st_end.max()) < hi2

    def span(*rows):
        st = con.initial(len(rows))
        for i, (mode, pos, grid) in enumerate(rows):
            st.mode[i], st.pos[i] = mode, pos
            st.grid[i] = torch.tensor(grid)
        return con.vocab_span(con.row_index(st), 10_000)

    # an image code needs only the image codebook's logits, a row end or a size its own ids, text the text range
    assert span((IMAGE, 2, (2, 3))) == sp.image_range()
    assert span((IMAGE, 5, (2, 3))) == (sp.eor, sp.eor + 1)
    assert span((IMAGE, 0, (0, 0))) == sp.size_range()
    assert span((TEXT, 0, (0, 0)))[1] <= sp.text_size
    # rows in different states: the union
    assert span((TEXT, 0, (0, 0)), (IMAGE, 3, (2, 3))) == (span((TEXT, 0, (0, 0)))[0], sp.image_range()[1])

"""Factored embeddings for image codes: a code's row is the sum of its factors' rows, folded into a
plain table for bundles."""

import pytest
import torch

from anymodal.errors import ConfigError
from anymodal.kernels.decode import NativeDecoder
from anymodal.kernels.decode import load as load_kernels
from anymodal.model import ModelConfig, Transformer, lm_loss
from anymodal.model.kv_cache import KVCache

# ids 40..71 are codes of 4 colours x 8 structures: code c = colour + 4 * structure
OFFSET, FACTORS = 40, [4, 8]


def _model(tie=True, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=tie,
                      code_offset=OFFSET, code_factors=FACTORS, **kw)
    return Transformer(cfg)


def test_a_code_row_is_the_sum_of_its_factor_rows():
    m = _model()
    colours, structures = m.code_factors.tables
    table = m.embedding_table().detach()
    assert torch.equal(table[:OFFSET], m.tok_emb.weight[:OFFSET].detach())
    assert torch.equal(table[OFFSET + 32:], m.tok_emb.weight[OFFSET + 32:].detach())
    for c in (0, 5, 13, 31):
        torch.testing.assert_close(table[OFFSET + c], (colours[c % 4] + structures[c // 4]).detach())
    # the sum has the table's init scale
    assert 0.5 < float(table[OFFSET:OFFSET + 32].std()) / m.cfg.init_std < 1.5
    seen = {}
    m.norm.register_forward_hook(lambda mod, args, out: seen.setdefault("h", out))
    logits = m(torch.tensor([[1, OFFSET + 5, 2]]))  # tied: a code's logit is the sum of its factors' logits
    h = seen["h"][0]  # [T, D]
    torch.testing.assert_close(logits[0, :, OFFSET + 5], h @ colours[1] + h @ structures[1], rtol=1e-5, atol=1e-5)


def test_a_code_never_in_the_data_is_built_from_what_was():
    # the data holds every colour and every structure, but never colour 3 with structure 5 (code 23):
    # that code's row and its logit move only through its factors, which the other codes train
    m = _model()
    unseen = 3 + 4 * 5
    seen = torch.tensor([c for c in range(32) if c != unseen]) + OFFSET
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    before = m.embedding_table()[OFFSET + unseen].detach().clone()
    for _ in range(30):
        ids = seen[torch.randint(0, len(seen), (4, 17), generator=g)]
        loss = lm_loss(m(ids[:, :-1]), ids[:, 1:], torch.zeros(4, 16, dtype=torch.long)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    colours, structures = m.code_factors.tables
    row = m.embedding_table()[OFFSET + unseen].detach()
    assert not torch.allclose(row, before)
    torch.testing.assert_close(row, (colours[3] + structures[5]).detach())
    assert m.tok_emb.weight.grad is None or not m.tok_emb.weight.grad[OFFSET:OFFSET + 32].any()


@pytest.mark.parametrize("tie", [True, False])
def test_folding_gives_a_plain_model_with_the_same_logits(tie):
    m = _model(tie=tie).eval()
    plain = m.fold_code_factors()
    assert plain.code_factors is None and plain.cfg.code_factors == [] and plain.cfg.tie_embeddings == tie
    assert set(plain.state_dict()) == set(Transformer(plain.cfg).state_dict())
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), m(ids), rtol=0, atol=1e-6)
        cache_a, cache_b = (KVCache.empty(m.cfg, 2, 16) for _ in range(2))
        torch.testing.assert_close(plain.prefill(ids, cache_a), m.prefill(ids, cache_b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("blind", [False, True])
def test_the_native_decoder_steps_factored_models_as_model_decode(blind):
    if load_kernels() is None:
        pytest.skip("no C compiler: the native decoder is off")
    m = _model(blind_decode=blind).eval()
    native = NativeDecoder.load(m)
    assert native is not None
    prompt = torch.tensor([[1, OFFSET + 9, 2, 3], [4, 5, OFFSET + 2, 6]])
    caches = [KVCache.empty(m.cfg, 2, 16) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            m.prefill(prompt, c)
        for tok in ([OFFSET + 13, 7], [5, OFFSET + 30], [OFFSET + 31, OFFSET + 0]):
            ids = torch.tensor(tok)[:, None]
            torch.testing.assert_close(native.step(ids, caches[0]), m.decode(ids, caches[1]), rtol=1e-4, atol=1e-4)


def test_code_block_must_lie_inside_the_vocabulary():
    with pytest.raises(ConfigError, match="code_factors"):
        ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, code_offset=40, code_factors=[4, 8])
    with pytest.raises(ConfigError, match="code_factors"):
        ModelConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, code_offset=40, code_factors=[4, 0])


def test_dropping_the_first_factor_embeds_a_code_as_its_structure_alone():
    m = _model().eval()
    colours, structures = m.code_factors.tables
    ids = torch.tensor([[1, OFFSET + 13, OFFSET + 6, 2]])  # a text token, codes (1, 3) and (2, 1), text
    drop = torch.tensor([[True, True, False, True]])  # only the first code is a dropped code
    seen = []
    m.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].detach()))
    with torch.no_grad():
        full, less = m(ids), m(ids, drop_first_factor=drop)
    x_full, x_less = seen
    torch.testing.assert_close(x_less[1], structures[3].detach())  # the structure row alone
    torch.testing.assert_close(x_less[[0, 2, 3]], x_full[[0, 2, 3]], rtol=0, atol=0)  # text and kept codes
    assert not torch.allclose(full[0, 1:], less[0, 1:])  # later positions read the colourless code
    torch.testing.assert_close(full[0, 0], less[0, 0], rtol=0, atol=0)  # causal: the first does not
    with pytest.raises(ValueError, match="code_factors"):
        Transformer(ModelConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, max_seq_len=64))(ids, drop_first_factor=drop)


def test_a_blind_decode_model_reads_the_codes_it_generates_as_their_structure():
    m = _model(blind_decode=True).eval()
    prompt = torch.tensor([[1, OFFSET + 9, 2, 3]])  # a code in the prompt is read whole
    new = [OFFSET + 13, 5, OFFSET + 30]  # generated: a code, a text id, a code
    cache = KVCache.empty(m.cfg, 1, 16)
    with torch.no_grad():
        steps = [m.prefill(prompt, cache)]
        steps += [m.decode(torch.tensor([[t]]), cache) for t in new]
        seq = torch.cat([prompt, torch.tensor([new])], 1)  # [1, 7]
        generated = torch.tensor([[False] * 4 + [True] * 3])
        want = m(seq, drop_first_factor=generated)[0, 3:]  # [4, V]
        whole = m(seq)[0, 3:]
    torch.testing.assert_close(torch.stack([s[0] for s in steps]), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[1:], whole[1:], atol=1e-4)  # from the first generated code on
    torch.testing.assert_close(want[0], whole[0], rtol=1e-5, atol=1e-5)  # the prompt reads the same
    plain = m.fold_code_factors()  # folded: a plain model that reads every code whole
    assert not plain.cfg.blind_decode and plain.code_factors is None
    with torch.no_grad():
        torch.testing.assert_close(plain(seq), m(seq), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="blind_decode"):
        ModelConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, max_seq_len=64, blind_decode=True)

"""Content embeddings for image codes: rows from per-code features, folded into a plain table."""

import pytest
import torch

from anymodal.errors import ConfigError
from anymodal.kernels.decode import NativeDecoder
from anymodal.model import ModelConfig, Transformer, lm_loss
from anymodal.model.kv_cache import KVCache


def _model(tie=True, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=tie,
                      code_offset=40, code_count=32, code_features=12, **kw)
    m = Transformer(cfg)
    m.code_content.features.copy_(torch.randn(32, 12))
    return m


def test_code_rows_come_from_the_features_and_alike_codes_embed_alike():
    m = _model()
    assert not m.tok_emb.weight[40:72].any()  # a code's own part starts at zero
    with torch.no_grad():
        m.code_content.features[5] = m.code_content.features[7]  # two codes that look the same
        table = m.embedding_table()
    assert torch.equal(table[:40], m.tok_emb.weight[:40]) and torch.equal(table[72:], m.tok_emb.weight[72:])
    assert torch.allclose(table[40:72], m.code_content.rows())
    assert torch.equal(table[45], table[47]) and not torch.equal(table[45], table[46])
    logits = m(torch.tensor([[1, 45, 2]]))
    assert torch.allclose(logits[0, :, 45], logits[0, :, 47])  # tied: the same output row too


def test_a_code_never_in_the_data_learns_from_the_others():
    # only codes 40..55 occur; code 60 shares code 41's features, so it follows it without appearing
    m = _model()
    with torch.no_grad():
        m.code_content.features[20] = m.code_content.features[1]
    before = m.embedding_table()[60].detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(40, 56, (4, 17), generator=g)
        loss = lm_loss(m(ids[:, :-1]), ids[:, 1:], torch.zeros(4, 16, dtype=torch.long)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    table, content = m.embedding_table().detach(), m.code_content.rows().detach()
    assert not torch.allclose(table[60], before)
    assert torch.equal(content[20], content[1])  # its content part is code 41's, trained on 41's uses


@pytest.mark.parametrize("tie", [True, False])
def test_folding_gives_a_plain_model_with_the_same_logits(tie):
    m = _model(tie=tie).eval()
    plain = m.fold_code_content()
    assert plain.code_content is None and plain.cfg.code_features == 0 and plain.cfg.tie_embeddings == tie
    assert set(plain.state_dict()) == set(Transformer(plain.cfg).state_dict())
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), m(ids), rtol=0, atol=1e-6)
        cache_a, cache_b = (KVCache.empty(m.cfg, 2, 16) for _ in range(2))
        torch.testing.assert_close(plain.prefill(ids, cache_a), m.prefill(ids, cache_b), rtol=0, atol=1e-6)


def test_the_native_decoder_leaves_content_models_to_model_decode():
    m = _model().eval()
    assert NativeDecoder.load(m) is None


def test_code_block_must_lie_inside_the_vocabulary():
    with pytest.raises(ConfigError, match="code_features"):
        ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, code_offset=40, code_count=32, code_features=4)

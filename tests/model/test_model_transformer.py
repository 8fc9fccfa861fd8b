"""Transformer behaviour: document masking, QK-Norm, both norm placements train, checkpointing, configs."""

import pytest
import torch

from anymodal.config import load_config
from anymodal.errors import ConfigError
from anymodal.model import ModelConfig, Transformer, fast_paths, lm_loss
from anymodal.model.transformer import RMSNorm, positions_from_docs


def _cfg(**kw):
    base = dict(vocab_size=64, dim=48, n_layers=2, n_heads=4, init_std=0.1)
    return ModelConfig(**{**base, **kw})


def test_positions_restart_at_each_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    assert positions_from_docs(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]]


def test_packed_documents_match_documents_alone():
    torch.manual_seed(0)
    model = Transformer(_cfg(n_kv_heads=2)).eval()
    docs = [torch.randint(0, 64, (n,)) for n in (5, 8, 3)]
    packed = torch.cat(docs)[None]  # [1, 16]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    labels = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])[None]  # no cross-doc labels
    with torch.no_grad():
        logits = model(packed, doc_ids=doc_ids)
        start = 0
        for d in docs:
            alone = model(d[None])  # [1, n, V]
            torch.testing.assert_close(logits[:, start : start + len(d)], alone, atol=1e-5, rtol=1e-5)
            part = lm_loss(logits[:, start : start + len(d)], labels[:, start : start + len(d)])
            ref = lm_loss(alone, torch.cat([d[1:], torch.tensor([-100])])[None])
            torch.testing.assert_close(part.ce, ref.ce, atol=1e-6, rtol=1e-6)
            start += len(d)
        # without the document mask the later documents would see the earlier ones
        leaky = model(packed)
    assert (leaky[:, 5:] - logits[:, 5:]).abs().max() > 1e-3


def test_qk_norm_normalizes_each_head():
    torch.manual_seed(0)
    model = Transformer(_cfg(n_kv_heads=2, init_std=0.02)).eval()
    attn = model.layers[0].attn
    norm = attn.qk_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    seen = {}
    norm.register_forward_hook(lambda m, i, o: seen.update(qk=(i[0], o)))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)))
    raw_qk, out_qk = seen["qk"]
    assert out_qk.shape == (2, 9, 4 + 2, 12)  # 4 q heads then 2 k heads
    for heads in (slice(0, 4), slice(4, 6)):  # q heads, k heads
        raw, out = raw_qk[:, :, heads], out_qk[:, :, heads]
        n = out.shape[2]
        z = (out - norm.bias[heads]) / norm.weight[heads]  # undo the per-head affine
        torch.testing.assert_close(z.mean(-1), torch.zeros(2, 9, n), atol=1e-5, rtol=0)
        raw_var = raw.var(-1, unbiased=False)  # unit variance up to LayerNorm's eps = 1e-5
        torch.testing.assert_close(z.var(-1, unbiased=False), raw_var / (raw_var + 1e-5), atol=1e-4, rtol=0)
        assert raw.std(-1).mean() < 0.3  # the raw projections were far from unit scale


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_invariant_to_qk_scale(qk_norm):
    torch.manual_seed(0)
    model = Transformer(_cfg(qk_norm=qk_norm)).eval()
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        before = model(ids)
        for layer in model.layers:  # scale the q and k rows of the fused projection
            layer.attn.wqkv.weight[: 2 * 48] *= 20.0
        after = model(ids)
    changed = (after - before).abs().max().item()
    assert (changed < 1e-4) if qk_norm else (changed > 1e-2)


@pytest.mark.parametrize("placement", ["pre", "swin"])
def test_both_norm_placements_learn_a_repetitive_sequence(placement):
    torch.manual_seed(0)
    model = Transformer(_cfg(norm_placement=placement, init_std=0.02))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    period = torch.randint(0, 64, (6,))
    seq = period.repeat(6)[None].expand(4, -1)  # [4, 36]
    losses = []
    for _ in range(40):
        out = lm_loss(model(seq[:, :-1]), seq[:, 1:], z_loss_weight=1e-4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce.item())
    assert losses[0] > 3.5  # ~ln(64) at init
    assert losses[-1] < 0.3, losses[::5]


def test_activation_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = Transformer(_cfg(activation_checkpointing=ckpt)).train()
        out = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Transformer(_cfg(dropout=0.3))
    ids = torch.randint(0, 64, (1, 8))
    model.train()
    assert not torch.allclose(model(ids), model(ids))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))


def test_init_scales_residual_projections():
    model = Transformer(ModelConfig(vocab_size=256, dim=128, n_layers=8, n_heads=4, init_std=0.02))
    assert abs(model.layers[0].attn.wqkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].attn.wo.weight.std().item() - 0.02 / 4) < 0.001  # / sqrt(2 * 8)
    assert abs(model.layers[3].mlp.w2.weight.std().item() - 0.02 / 4) < 0.001
    assert torch.equal(model.layers[0].attn.qk_norm.bias, torch.zeros(8, 32))
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_config_derives_and_validates():
    cfg = ModelConfig(vocab_size=64, dim=96, n_heads=6)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.mlp_hidden) == (16, 6, 256)  # 8/3·96 = 256
    with pytest.raises(ConfigError, match="norm_placement"):
        ModelConfig(norm_placement="post")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(dim=100, n_heads=8)
    with pytest.raises(ConfigError, match="norm_placement"):
        load_config(ModelConfig, "model/demo.yaml", ["norm_placement=middle"])


@pytest.mark.parametrize("name", ["demo", "100m", "1b", "7b"])
def test_presets_load(name):
    cfg = load_config(ModelConfig, f"model/{name}.yaml")
    assert cfg.dim % cfg.n_heads == 0 and cfg.mlp_hidden % cfg.multiple_of == 0
    if name == "demo":
        n = Transformer(cfg).num_params()
        assert 7e6 < n < 11e6, n


def test_rmsnorm_is_hf_formula():
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 16), torch.randn(16)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))  # HF's formula
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-5)


def test_fast_paths_are_offered_the_call_and_may_decline():
    """A registered op replaces the reference only where it returns a value; None keeps the reference."""
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = model(ids)
        seen = []
        try:
            fast_paths.register(swiglu=lambda h: seen.append(h.shape) or None)  # declines every call
            torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)
            assert seen == [(2, 9, 2 * model.cfg.mlp_hidden)] * model.cfg.n_layers
            fast_paths.register(swiglu=lambda h: torch.zeros(*h.shape[:-1], h.shape[-1] // 2))  # MLP off
            assert not torch.allclose(model(ids), ref)
        finally:
            fast_paths.register(swiglu=None)
        torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)
    with pytest.raises(KeyError, match="unknown op"):
        fast_paths.register(flash=None)

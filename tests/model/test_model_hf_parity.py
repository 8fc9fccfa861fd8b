"""Our Transformer and HF transformers' Chameleon (text path) give the same logits for the same weights."""

import pytest
import torch

from anymodal.model import ModelConfig, Transformer
from anymodal.model.hf import from_hf_state_dict, hf_chameleon, hf_config_kwargs, to_hf_state_dict

transformers = pytest.importorskip("transformers")

@pytest.mark.parametrize("placement,kv_heads", [("pre", 4), ("swin", 2)])
def test_logits_match_hf_chameleon(placement, kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=96,
        dim=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=kv_heads,
        norm_placement=placement,
        rope_theta=500.0,
        init_std=0.1,
    )
    ours = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial QK-Norm and RMSNorm weights, so a mix-up shows
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    hf = hf_chameleon(cfg, attn="eager").eval()  # the reference: plain softmax(qkᵀ)v
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected
    assert all(k.startswith("model.vqmodel.") for k in missing), missing

    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 17, cfg.vocab_size)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    # and back: HF weights → ours reproduces the original state dict exactly
    back = from_hf_state_dict(hf.state_dict(), cfg)
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_export_refuses_models_hf_cannot_represent():
    with pytest.raises(ValueError, match="QK-Norm"):
        hf_config_kwargs(ModelConfig(vocab_size=64, dim=64, n_heads=4, qk_norm=False))
    with pytest.raises(ValueError, match="head_dim"):
        hf_config_kwargs(ModelConfig(vocab_size=64, dim=64, n_heads=4, head_dim=32))

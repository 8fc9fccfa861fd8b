"""flops_per_token counts the model's matmul weights; peak table lookup; CPU peak measurement."""

import torch

from anymodal.model import ModelConfig, Transformer, flops_per_token, measure_cpu_matmul_peak, peak_flops


def test_flops_count_matches_the_model():
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=2)
    model = Transformer(cfg)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "norm" not in n)
    matmul_params -= model.tok_emb.weight.numel()  # a lookup, not a matmul
    t = 100
    fwd = flops_per_token(cfg, t, training=False)  # causal: a query sees (t + 1) / 2 keys on average
    assert fwd == 2 * matmul_params + 4 * cfg.n_layers * (t + 1) / 2 * cfg.n_heads * cfg.head_dim
    assert flops_per_token(cfg, t) == 3 * fwd
    palm = flops_per_token(cfg, t, training=False, causal=False)  # every key counted
    assert palm == 2 * matmul_params + 4 * cfg.n_layers * t * cfg.n_heads * cfg.head_dim


def test_peak_table_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A10G", "fp32") == 31.2e12
    assert peak_flops("Some Unknown GPU") is None


def test_cpu_matmul_peak_is_plausible():
    flops = measure_cpu_matmul_peak(seconds=0.05, size=256)
    assert 1e8 < flops < 1e14
    assert torch.get_num_threads() == 1  # restored (conftest sets one thread)

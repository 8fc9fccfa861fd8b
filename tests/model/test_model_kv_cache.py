"""KV-cache prefill + decode reproduces the full forward, also for left-padded (mixed-length) batches."""

import pytest
import torch

from anymodal.model import KVCache, ModelConfig, Transformer


def _model(kv_heads=2, placement="pre"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=80,
        dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=kv_heads,
        norm_placement=placement,
        init_std=0.1,
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kv_heads,placement", [(2, "pre"), (4, "swin")])
def test_prefill_then_decode_matches_full_forward(kv_heads, placement):
    model = _model(kv_heads, placement)
    ids = torch.randint(0, 80, (3, 12))
    with torch.no_grad():
        full = model(ids)  # [3, 12, V]
    cache = KVCache.empty(model.cfg, batch=3, max_len=16)
    steps = [model.prefill(ids[:, :5], cache)]
    for t in range(5, 12):
        steps.append(model.decode(ids[:, t : t + 1], cache))
    got = torch.stack(steps, dim=1)  # [3, 8, V]
    assert cache.length == 12 and cache.next_pos.tolist() == [12, 12, 12]
    torch.testing.assert_close(got, full[:, 4:], atol=1e-5, rtol=1e-5)
    # a multi-token step after prefill (e.g. forced tokens) also matches
    cache.reset()
    model.prefill(ids[:, :5], cache)
    with torch.no_grad():
        chunk = model(ids[:, 5:9], cache=cache)
    torch.testing.assert_close(chunk, full[:, 5:9], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_each_prompt_alone():
    model = _model()
    pad = 0
    prompts = [torch.randint(1, 80, (n,)) for n in (7, 3, 5)]
    cont = torch.randint(1, 80, (3, 4))  # tokens fed while decoding
    t = max(len(p) for p in prompts)
    ids = torch.full((3, t), pad)
    mask = torch.zeros(3, t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = p
        mask[i, t - len(p) :] = True
    cache = KVCache.empty(model.cfg, batch=3, max_len=t + 4)
    batched = [model.prefill(ids, cache, attention_mask=mask)]
    for j in range(4):
        batched.append(model.decode(cont[:, j : j + 1], cache))
    batched = torch.stack(batched, dim=1)  # [3, 5, V]
    assert torch.isfinite(batched).all()
    assert cache.next_pos.tolist() == [7 + 4, 3 + 4, 5 + 4]
    for i, p in enumerate(prompts):
        alone = torch.cat([p, cont[i]])[None]  # [1, n + 4]
        with torch.no_grad():
            ref = model(alone)[0, len(p) - 1 :]  # logits after the prompt and after each fed token
        torch.testing.assert_close(batched[i], ref, atol=1e-5, rtol=1e-5)


def test_full_forward_with_padding_mask_matches_unpadded():
    model = _model()
    p = torch.randint(1, 80, (6,))
    ids = torch.cat([torch.zeros(3, dtype=torch.long), p])[None]
    mask = torch.tensor([[False] * 3 + [True] * 6])
    with torch.no_grad():
        got = model(ids, attention_mask=mask)[0, 3:]
        ref = model(p[None])[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cache_select_and_overflow():
    model = _model()
    ids = torch.randint(0, 80, (3, 6))
    cache = KVCache.empty(model.cfg, batch=3, max_len=7)
    model.prefill(ids, cache)
    sub = cache.select(torch.tensor([2, 0]))
    nxt = torch.randint(0, 80, (3, 1))
    both = model.decode(nxt, cache)
    only = model.decode(nxt[[2, 0]], sub)
    torch.testing.assert_close(only, both[[2, 0]], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="KV cache full"):
        model.decode(nxt, cache)


def test_bf16_model_runs_and_caches_like_fp32():
    """The GPU dtype path (SDPA, HF-order RMSNorm cast, bf16 cache) on CPU: close to fp32."""
    model = _model()
    ids = torch.randint(0, 80, (2, 9))
    with torch.no_grad():
        ref = model(ids)
    model16 = _model().to(torch.bfloat16)
    with torch.no_grad():
        full = model16(ids)
    assert full.dtype == torch.bfloat16
    torch.testing.assert_close(full.float(), ref, atol=0.05, rtol=0.05)
    cache = KVCache.empty(model16.cfg, batch=2, max_len=9, dtype=torch.bfloat16)
    model16.prefill(ids[:, :8], cache)
    last = model16.decode(ids[:, 8:], cache)
    torch.testing.assert_close(last.float(), full[:, -1].float(), atol=0.05, rtol=0.05)

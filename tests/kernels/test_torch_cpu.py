"""The PyTorch CPU fast paths (anymodal/kernels/torch_cpu.py) compute what the reference computes."""

import pytest
import torch
import torch.nn.functional as F

from anymodal import kernels
from anymodal.kernels import torch_cpu
from anymodal.model import ModelConfig, Transformer, fast_paths, lm_loss


@pytest.fixture
def no_fast_paths():
    kernels.uninstall()
    yield
    kernels.uninstall()


@pytest.mark.parametrize("with_docs", [False, True])
def test_torch_fast_paths_match_the_reference_values_and_grads(no_fast_paths, with_docs):
    """Blocked attention (several query blocks, GQA, packed documents), RMSNorm and SwiGLU from
    `install(native=False)` equal the model's reference, forward and backward."""
    t = 300  # 3 blocks of 128, the last one partial
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, t))
    doc_ids = torch.cat([torch.zeros(2, 100), torch.ones(2, 150), torch.full((2, 50), 2)], dim=1) if with_docs else None
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.1)
    results = []
    for fast in (True, False):
        kernels.install(native=False) if fast else kernels.uninstall()
        torch.manual_seed(1)
        model = Transformer(cfg)
        logits = model(ids, doc_ids=doc_ids)
        lm_loss(logits[:, :-1], ids[:, 1:]).loss.backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fast_paths_decline_where_they_do_not_apply(no_fast_paths):
    kernels.install(native=False)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert fast_paths.call("rms_norm", x, torch.ones(8, dtype=torch.float64), 1e-5) is None  # not fp32
    assert fast_paths.call("swiglu", x.float()) is not None
    assert fast_paths.call("cross_entropy", x.float().view(-1, 8), torch.zeros(10, dtype=torch.long), False) is None


@pytest.mark.parametrize("kv_heads,with_bias", [(4, False), (2, True)])
def test_autograd_functions_pass_gradcheck(monkeypatch, kv_heads, with_bias):
    monkeypatch.setattr(torch_cpu, "ATTN_BLOCK", 4)  # several blocks (the last one partial) on a tiny input
    torch.manual_seed(0)
    qk = torch.randn(2, 10, 4 + kv_heads, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 10, kv_heads, 6, dtype=torch.float64, requires_grad=True)
    bias = None
    if with_bias:
        docs = torch.tensor([[0] * 6 + [1] * 4, [0] * 3 + [1] * 7])
        allowed = (docs[:, :, None] == docs[:, None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
        bias = torch.zeros(2, 1, 10, 10, dtype=torch.float64).masked_fill_(~allowed[:, None], float("-inf"))
    assert torch.autograd.gradcheck(lambda a, b: torch_cpu.blocked_attention(a, b, 4, bias), (qk, v))
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch_cpu.SwiGLUFunction.apply, (h,))
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: torch_cpu.RMSNormFunction.apply(a, b, 1e-5), (x, w))
    torch.testing.assert_close(torch_cpu.RMSNormFunction.apply(x, w, 1e-5), F.rms_norm(x, (16,), w, eps=1e-5))

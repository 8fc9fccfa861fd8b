"""The native CPU training kernels compute what the PyTorch paths compute, forward and backward."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anymodal import kernels
from anymodal.kernels import attention as native_attn
from anymodal.kernels import elementwise, torch_cpu
from anymodal.model import ModelConfig, Transformer, fast_paths, lm_loss
from anymodal.model import transformer as tr
from anymodal.model.loss import _CrossEntropyAndLSE

HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def _need(lib_module):
    if lib_module.load() is None:
        pytest.skip(f"native kernel unavailable: {lib_module.unavailable_reason()}")


@pytest.fixture
def pytorch_paths():
    """Each test starts and ends with nothing registered (the registry is process-wide)."""
    kernels.uninstall()
    yield
    kernels.uninstall()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the native kernels cannot be built here")
def test_kernels_build_install_and_uninstall(pytorch_paths):
    assert native_attn.load() is not None, native_attn.unavailable_reason()
    assert elementwise.load() is not None, elementwise.unavailable_reason()
    assert kernels.install() == {"attention": True, "swiglu": True, "rms_norm": True, "cross_entropy": True}
    assert all(fast_paths.registered().values())
    assert kernels.install(native=False) == dict.fromkeys(fast_paths.OPS, False)
    kernels.uninstall()
    assert not any(fast_paths.registered().values())


def _docs(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):
        for cut in torch.randint(1, t, (3,), generator=g).tolist():
            doc[row, cut:] += 1
    return doc


def _short_docs(b: int, t: int, seed: int) -> torch.Tensor:
    """Many packed documents of 1-40 tokens, so query blocks hold several (the kernel's segments)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (b, t), generator=g)
    doc = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):
        starts = lengths[row].cumsum(0)
        starts = starts[starts < t]
        doc[row, starts] = 1
    return doc.cumsum(1)


def _reference(qkv, w, bias, rot, doc, h):
    """The model's PyTorch path from the fused projection: QK-Norm, RoPE, blocked attention."""
    hkv = (qkv.shape[2] - h) // 2
    qk, v = qkv.split([h + hkv, hkv], dim=2)
    if w is not None:
        qk = torch.addcmul(bias, F.layer_norm(qk, (qk.shape[-1],), eps=tr.QK_NORM_EPS), w)
    qk = tr.apply_rope(qk, rot)
    bias_mask = None
    if doc is not None:
        t = qkv.shape[1]
        allowed = (torch.arange(t)[None, :] <= torch.arange(t)[:, None])[None] & (doc[:, :, None] == doc[:, None, :])
        bias_mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[:, None]
    return torch_cpu.blocked_attention(qk, v, h, bias_mask)


@pytest.mark.parametrize(
    "b,t,h,hkv,hd,qk_norm,docs",
    [
        (2, 200, 4, 4, 64, True, False),  # T not a multiple of the 64-row query block
        (2, 200, 4, 4, 64, True, True),  # packed documents
        (3, 130, 4, 2, 32, True, True),  # grouped-query heads
        (1, 64, 2, 1, 16, False, False),  # no QK-Norm, one block
        (2, 257, 2, 2, 8, True, True),
        (2, 300, 4, 4, 32, True, "short"),  # several short documents in every query block
    ],
)
def test_attention_matches_pytorch_path(pytorch_paths, b, t, h, hkv, hd, qk_norm, docs):
    _need(native_attn)
    torch.manual_seed(0)
    qkv = torch.randn(b, t, h + 2 * hkv, hd, requires_grad=True)
    w = (1 + 0.3 * torch.randn(h + hkv, hd)).requires_grad_() if qk_norm else None
    bias = (0.2 * torch.randn(h + hkv, hd)).requires_grad_() if qk_norm else None
    doc = (_short_docs if docs == "short" else _docs)(b, t, seed=t) if docs else None
    pos = tr.positions_from_docs(doc) if docs else torch.arange(t).expand(b, t)
    rot = tr.rope_tables(pos, hd, 10000.0)
    key_start = tr.doc_key_start(doc) if docs else None
    dy = torch.randn(b, t, h * hd)
    inputs = [x for x in (qkv, w, bias) if x is not None]

    y = native_attn.native_attention(qkv, w, bias, rot, key_start, h, tr.QK_NORM_EPS)
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = _reference(qkv, w, bias, rot, doc, h)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)

    assert y.shape == (b, t, h * hd) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    if docs:  # a query never sees an earlier document: changing one leaves the later outputs alone
        first_doc_end = int((doc[0] == 0).sum())
        qkv2 = qkv.detach().clone()
        qkv2[0, :first_doc_end] += 1.0
        y2 = native_attn.native_attention(qkv2, w, bias, rot, key_start, h, tr.QK_NORM_EPS)
        torch.testing.assert_close(y2[0, first_doc_end:], y.detach()[0, first_doc_end:], atol=0, rtol=0)
        assert not torch.allclose(y2[0, :first_doc_end], y.detach()[0, :first_doc_end])


_THREAD_CHECK = """
import torch
from anymodal.kernels import attention as native_attn
from anymodal.model import transformer as tr
assert native_attn.load() is not None, native_attn.unavailable_reason()
torch.manual_seed(1)
b, t, h, hkv, hd = 3, 150, 4, 2, 32
qkv = torch.randn(b, t, h + 2 * hkv, hd, requires_grad=True)
w, bias = torch.randn(h + hkv, hd, requires_grad=True), torch.randn(h + hkv, hd, requires_grad=True)
rot = tr.rope_tables(torch.arange(t).expand(b, t), hd, 10000.0)
dy = torch.randn(b, t, h * hd)
out = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    y = native_attn.native_attention(qkv, w, bias, rot, None, h, tr.QK_NORM_EPS)
    out.append([y.detach(), *torch.autograd.grad(y, (qkv, w, bias), dy)])
assert all(torch.equal(a, c) for a, c in zip(*out)), "results differ between 1 and 2 threads"
"""


def test_attention_results_do_not_depend_on_thread_count():
    _need(native_attn)
    # Each (batch, head) slice is one thread's work in a fixed order, so the thread count cannot
    # change a result. MKL's own sgemm can (seen on the lent H200 machine's CPU, where the check passes
    # with MKL_CBWR=COMPATIBLE); MKL reads that setting once, at start-up: a fresh process.
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
    r = subprocess.run([sys.executable, "-c", _THREAD_CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_swiglu_matches_autograd(pytorch_paths):
    _need(elementwise)
    torch.manual_seed(0)
    h = (torch.randn(3, 37, 2 * 50) * 4).requires_grad_()
    dy = torch.randn(3, 37, 50)
    y = elementwise.swiglu(h)
    (g,) = torch.autograd.grad(y, h, dy)
    h64 = h.detach().double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    y64 = F.silu(gate) * up
    (g64,) = torch.autograd.grad(y64, h64, dy.double())
    assert y.shape == (3, 37, 50)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-5)
    # extreme inputs stay finite (the exp is clamped): silu(-200) = 0, silu(200) = 200
    x = torch.tensor([[-200.0, 200.0, 1.0, 1.0]])
    torch.testing.assert_close(elementwise.swiglu(x), torch.tensor([[-0.0, 200.0]]), atol=1e-6, rtol=0)


def test_rms_norm_matches_pytorch(pytorch_paths):
    _need(elementwise)
    torch.manual_seed(0)
    x = (torch.randn(5, 300, 96) * 3).requires_grad_()  # 1,500 rows: several weight-gradient chunks
    w = (1 + 0.5 * torch.randn(96)).requires_grad_()
    g = torch.randn(5, 300, 96)
    y = elementwise.rms_norm(x, w, 1e-5)
    grads = torch.autograd.grad(y, (x, w), g)
    y_ref = torch_cpu.RMSNormFunction.apply(x, w, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, (x, w), g)
    torch.testing.assert_close(y, F.rms_norm(x, (96,), w, eps=1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_matches_pytorch(pytorch_paths, inplace):
    _need(elementwise)
    torch.manual_seed(0)
    x = torch.randn(300, 1000) * 5
    target = torch.randint(0, 1000, (300,))
    weights = torch.randn(300)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ce, lse = elementwise.cross_entropy(xa * 1.0, target, inplace)
    ce_ref, lse_ref = _CrossEntropyAndLSE.apply(xb * 1.0, target, inplace)
    torch.testing.assert_close(ce, F.cross_entropy(x, target, reduction="none"), atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1), atol=2e-5, rtol=1e-6)
    (ce * weights + lse.square()).sum().backward()
    (ce_ref * weights + lse_ref.square()).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"qk_norm": False}, {"norm_placement": "swin"}])
def test_model_and_loss_with_kernels_equal_pytorch(pytorch_paths, kw):
    """Logits, loss and every parameter gradient of a packed batch agree with the native kernels and
    with the reference."""
    _need(native_attn)
    _need(elementwise)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, mlp_hidden=96, max_seq_len=256, **kw)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 128, (3, 101))
    doc = _docs(3, 101, seed=5)
    mod = torch.randint(0, 4, (3, 100))
    results = []
    for native in (True, False):
        kernels.install() if native else kernels.uninstall()
        model.zero_grad()
        logits = model(ids[:, :-1], doc_ids=doc[:, :-1])
        out = lm_loss(logits.clone(), ids[:, 1:], mod, z_loss_weight=1e-3, inplace_backward=True)
        out.loss.backward()
        results.append((logits.detach(), out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lg_n, out_n, g_n), (lg_t, out_t, g_t) = results
    torch.testing.assert_close(lg_n, lg_t, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(out_n.ce, out_t.ce, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_n.z_loss, out_t.z_loss, atol=1e-7, rtol=1e-5)
    for m in ("text", "image", "audio", "loc"):
        torch.testing.assert_close(out_n.per_modality_sum[m], out_t.per_modality_sum[m], atol=1e-4, rtol=1e-6)
    for name in g_t:
        torch.testing.assert_close(g_n[name], g_t[name], atol=2e-6, rtol=1e-4, msg=name)

"""Fused SwiGLU, RMSNorm and cross-entropy passes on the CPU (anymodal/kernels/elementwise_cpu.c).

`swiglu(h)`, `rms_norm(x, weight, eps)` and `cross_entropy(x, target, inplace)` are autograd
functions with the math of the model's SwiGLU and RMSNorm and the loss's `_CrossEntropyAndLSE`
(fp32, CPU, contiguous rows), each direction one pass over memory. `anymodal.kernels.install()`
registers them in `anymodal.model.fast_paths`; without a C compiler, or with `ANYMODAL_NATIVE=0`,
the PyTorch versions (`torch_cpu.py`) run.
"""

from __future__ import annotations

import ctypes

import torch

from .build import KERNEL_DIR, NativeLibrary

SOURCE = KERNEL_DIR / "elementwise_cpu.c"


def _declare(lib: ctypes.CDLL) -> None:
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.am_swiglu_forward.argtypes = [i64, i64, p, p]
    lib.am_swiglu_backward.argtypes = [i64, i64, p, p, p]
    lib.am_cross_entropy_forward.argtypes = [i64, i64, p, p, p, p]
    lib.am_cross_entropy_backward.argtypes = [i64, i64, p, p, p, p, p, p]
    lib.am_rms_norm_forward.argtypes = [i64, i64, p, p, ctypes.c_float, p, p]
    lib.am_rms_norm_backward.argtypes = [i64, i64, p, p, p, p, p, i64, p]
    for f in (lib.am_swiglu_forward, lib.am_swiglu_backward, lib.am_cross_entropy_forward,
              lib.am_cross_entropy_backward, lib.am_rms_norm_forward, lib.am_rms_norm_backward):
        f.restype = None


_library = NativeLibrary(SOURCE, _declare, "elementwise kernels")


def load() -> ctypes.CDLL | None:
    """The loaded library, or None when disabled or unavailable (see `unavailable_reason`)."""
    return _library.get()


def unavailable_reason() -> str | None:
    return _library.reason


class _SwiGLU(torch.autograd.Function):
    """silu(gate) · up on h [..., 2F] = [gate | up] → [..., F]; only h is saved."""

    @staticmethod
    def forward(ctx, h: torch.Tensor):
        h = h.contiguous()
        f = h.shape[-1] // 2
        y = torch.empty(*h.shape[:-1], f, dtype=h.dtype)
        _library.lib.am_swiglu_forward(h.numel() // (2 * f), f, h.data_ptr(), y.data_ptr())
        ctx.save_for_backward(h)
        return y

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        dy = dy.contiguous()
        f = h.shape[-1] // 2
        dh = torch.empty_like(h)
        _library.lib.am_swiglu_backward(h.numel() // (2 * f), f, h.data_ptr(), dy.data_ptr(), dh.data_ptr())
        return dh


NORM_CHUNK = 256  # rows per partial sum of the RMSNorm weight gradient


class _RMSNorm(torch.autograd.Function):
    """w · x / sqrt(mean(x²) + eps) over the last dim; saves x and 1/rms per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        x = x.contiguous()
        d = x.shape[-1]
        n = x.numel() // d
        out = torch.empty_like(x)
        rstd = torch.empty(n, dtype=x.dtype)
        _library.lib.am_rms_norm_forward(n, d, x.data_ptr(), weight.contiguous().data_ptr(), eps,
                                         out.data_ptr(), rstd.data_ptr())
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        g = g.contiguous()
        d = x.shape[-1]
        n = x.numel() // d
        dx = torch.empty_like(x)
        part = torch.empty(-(-n // NORM_CHUNK), d, dtype=x.dtype)
        _library.lib.am_rms_norm_backward(n, d, x.data_ptr(), weight.contiguous().data_ptr(), rstd.data_ptr(),
                                          g.data_ptr(), dx.data_ptr(), NORM_CHUNK, part.data_ptr())
        return dx, part.sum(0), None


class _CrossEntropy(torch.autograd.Function):
    """Per row of x [N, V]: (ce = lse − x[target], lse = logsumexp(x)), fp32 [N] each.

    Only x, target and lse are saved; backward is one pass (into x's own storage when inplace)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor, inplace: bool):
        x = x.contiguous()
        target = target.to(torch.int64).contiguous()
        n, v = x.shape
        ce = torch.empty(n, dtype=torch.float32)
        lse = torch.empty(n, dtype=torch.float32)
        _library.lib.am_cross_entropy_forward(n, v, x.data_ptr(), target.data_ptr(), ce.data_ptr(), lse.data_ptr())
        ctx.save_for_backward(x, target, lse)
        ctx.inplace = inplace
        return ce, lse

    @staticmethod
    def backward(ctx, g_ce, g_lse):
        x, target, lse = ctx.saved_tensors
        n, v = x.shape
        g_ce = torch.zeros(n) if g_ce is None else g_ce.float().contiguous()
        g_lse = None if g_lse is None else g_lse.float().contiguous()
        grad = x if ctx.inplace else torch.empty_like(x)
        _library.lib.am_cross_entropy_backward(
            n, v, x.data_ptr(), target.data_ptr(), lse.data_ptr(), g_ce.data_ptr(),
            None if g_lse is None else g_lse.data_ptr(), grad.data_ptr(),
        )
        return grad, None, None


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(h[..., :F]) · h[..., F:] (the library must be loaded)."""
    return _SwiGLU.apply(h)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] with weight [D] (the library must be loaded)."""
    return _RMSNorm.apply(x, weight, eps)


def cross_entropy(x: torch.Tensor, target: torch.Tensor, inplace: bool = False):
    """(ce [N], lse [N]) of logits x [N, V] against target [N] (the library must be loaded)."""
    return _CrossEntropy.apply(x, target, inplace)

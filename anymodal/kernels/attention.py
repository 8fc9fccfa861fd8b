"""Training attention on the CPU through the native kernel (anymodal/kernels/attention_cpu.c).

`native_attention(qkv, qk_w, qk_b, rope, key_start, n_heads, eps)` takes the fused q|k|v projection
and computes exactly what the model's PyTorch path computes from it (QK-Norm, RoPE, then causal
softmax attention as `torch_cpu.blocked_attention`, optionally limited to each query's own packed document),
forward and backward in C. QK-Norm and RoPE are one pass each way; in attention each OpenMP thread
takes whole (batch, head) slices and calls PyTorch's own BLAS `sgemm` (MKL) on them
single-threaded. The softmax probabilities are kept for the backward pass, as in the PyTorch path,
and the gradient of q|k|v is written into one buffer (no concatenation of the q, k and v parts).

`anymodal.kernels.install()` registers it in `anymodal.model.fast_paths`. It is unavailable, and
the PyTorch path runs instead, when there is no C compiler, `ANYMODAL_NATIVE=0`, or this
PyTorch build exports no BLAS `sgemm`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .build import KERNEL_DIR, NativeLibrary

SOURCE = KERNEL_DIR / "attention_cpu.c"
QUERY_BLOCK = 128  # query rows per block: causal work is (n+1)/2n of T^2 for n = T / 128 blocks.
# 64-row blocks waste less of the diagonal but give the dk/dv products an inner size of 64; over
# whole demo-preset training steps the two came out within 2% (paired medians of 8: 64 rows 1.8%
# slower at 8 x 512, 1.1% faster at 3 x 1536), so the larger, fewer GEMMs stay.


def _torch_sgemm() -> int:
    """Address of the BLAS sgemm (Fortran interface) in PyTorch's CPU library: MKL in x86 wheels."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            for sym in ("sgemm_", "sgemm"):
                fn = getattr(lib, sym, None)
                if fn is not None:
                    return ctypes.cast(fn, ctypes.c_void_p).value
    raise RuntimeError("this PyTorch build exports no BLAS sgemm")


_gemm: int | None = None


def _declare(lib: ctypes.CDLL) -> None:
    global _gemm
    _gemm = _torch_sgemm()
    i64, f32, p = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.am_attn_forward.argtypes = [i64] * 6 + [f32, p, i64, p, i64, p, p, p, p]
    lib.am_attn_backward.argtypes = [i64] * 6 + [f32, p, i64, p, i64, p, p, p, p, i64, p, i64, p]
    lib.am_attn_forward.restype = lib.am_attn_backward.restype = ctypes.c_int
    lib.am_qk_norm_rope_forward.argtypes = [i64] * 4 + [p, i64, p, p, f32, p, p, p, p]
    lib.am_qk_norm_rope_backward.argtypes = [i64] * 4 + [p, i64, p, p, p, p, p, i64, i64, p, p]
    lib.am_qk_norm_rope_forward.restype = lib.am_qk_norm_rope_backward.restype = None
    lib.am_attn_probs_per_head.argtypes = [i64, i64]
    lib.am_attn_probs_per_head.restype = i64


_library = NativeLibrary(SOURCE, _declare, "attention kernel")


def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when disabled or unavailable (see `unavailable_reason`)."""
    return _library.get()


def unavailable_reason() -> str | None:
    """Why `load()` returned None (after it was called)."""
    return _library.reason


NORM_CHUNK = 256  # (b, t) rows per partial sum of the QK-Norm weight gradients


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _NativeAttention(torch.autograd.Function):
    """y [B, T, H·hd] from the fused projection qkv [B, T, H + 2·Hkv, hd] (fp32, CPU)."""

    @staticmethod
    def forward(ctx, qkv, qk_w, qk_b, rope, key_start, n_heads: int, eps: float):
        lib = _library.lib
        qkv = qkv.contiguous()
        b, t, n_all, hd = qkv.shape
        h = n_heads
        hkv = (n_all - h) // 2
        nh, ld = h + hkv, n_all * hd
        rot = torch.view_as_real(rope).expand(b, t, 1, hd // 2, 2).contiguous()  # (cos, sin) per pair
        qk = torch.empty(b, t, nh, hd, dtype=qkv.dtype)  # normalized and rotated q | k heads
        stats = torch.empty(2, b, t, nh, dtype=qkv.dtype) if qk_w is not None else None  # mean, rstd
        lib.am_qk_norm_rope_forward(
            b, t, nh, hd, qkv.data_ptr(), ld, _ptr(qk_w), _ptr(qk_b), eps, rot.data_ptr(), qk.data_ptr(),
            _ptr(None if stats is None else stats[0]), _ptr(None if stats is None else stats[1]),
        )
        v_ptr = qkv.data_ptr() + nh * hd * qkv.element_size()  # the v heads of the same buffer
        y = torch.empty(b, t, h * hd, dtype=qkv.dtype)
        probs = torch.empty(b * h * lib.am_attn_probs_per_head(t, QUERY_BLOCK), dtype=qkv.dtype)
        lib.am_attn_forward(
            b, t, h, hkv, hd, QUERY_BLOCK, hd**-0.5, qk.data_ptr(), nh * hd, v_ptr, ld, _ptr(key_start),
            y.data_ptr(), probs.data_ptr(), _gemm,
        )
        ctx.save_for_backward(qkv, qk, qk_w, rot, stats, probs, key_start)
        ctx.dims = (b, t, h, hkv, hd)
        return y

    @staticmethod
    def backward(ctx, dy):
        lib = _library.lib
        qkv, qk, qk_w, rot, stats, probs, key_start = ctx.saved_tensors
        b, t, h, hkv, hd = ctx.dims
        nh, ld = h + hkv, (h + 2 * hkv) * hd
        dy = dy.contiguous()
        dqkv = torch.empty_like(qkv)
        itemsize = qkv.element_size()
        rc = lib.am_attn_backward(
            b, t, h, hkv, hd, QUERY_BLOCK, hd**-0.5, qk.data_ptr(), nh * hd,
            qkv.data_ptr() + nh * hd * itemsize, ld, _ptr(key_start), probs.data_ptr(), dy.data_ptr(),
            dqkv.data_ptr(), ld, dqkv.data_ptr() + nh * hd * itemsize, ld, _gemm,
        )
        if rc:
            raise MemoryError("native attention backward could not allocate its scratch buffers")
        n_chunks = -(-b * t // NORM_CHUNK)
        part = torch.empty(2, n_chunks, nh, hd, dtype=qkv.dtype) if qk_w is not None else None
        lib.am_qk_norm_rope_backward(  # d(rotated q|k) -> d(projected q|k), in place in dqkv
            b, t, nh, hd, qkv.data_ptr(), ld, _ptr(qk_w), rot.data_ptr(),
            _ptr(None if stats is None else stats[0]), _ptr(None if stats is None else stats[1]),
            dqkv.data_ptr(), ld, NORM_CHUNK, _ptr(None if part is None else part[0]),
            _ptr(None if part is None else part[1]),
        )
        dw = db = None
        if part is not None:
            dw, db = part.sum(1).unbind(0)  # [nh, hd] each, summed over the chunks in order
        return dqkv, dw, db, None, None, None, None


def native_attention(qkv: torch.Tensor, qk_w: torch.Tensor | None, qk_b: torch.Tensor | None,
                     rope: torch.Tensor, key_start: torch.Tensor | None, n_heads: int, eps: float):
    """QK-Norm (qk_w/qk_b [H + Hkv, hd], or None for none), RoPE (rope: the model's complex
    [B, T, 1, hd/2] rotations) and causal attention of qkv [B, T, H + 2·Hkv, hd] → y [B, T, H·hd].
    key_start [B, T]: the first key each query may see (None: 0). The kernel must be loaded."""
    if key_start is not None:
        key_start = key_start.to(torch.int32).contiguous()
    return _NativeAttention.apply(qkv, qk_w, qk_b, rope, key_start, n_heads, eps)

"""The CPU speed paths of the model, registered into `anymodal.model.fast_paths` from outside it.

- `attention` / `elementwise`: native C kernels (OpenMP; BLAS from PyTorch's own library) for
  training attention (QK-Norm, RoPE, causal attention within packed documents), SwiGLU, RMSNorm and
  cross-entropy, compiled on first use by `build`;
- `torch_cpu`: PyTorch versions of the same passes with hand-written backward (blocked matmul
  attention and friends), for when a native kernel cannot be built;
- `decode`: the native single-token decode step that sampling uses on a CPU.

`install()` (called by the trainer, eval and the benchmarks) registers, for CPU fp32 tensors, the
native kernel of each op where it loads and the PyTorch fast path otherwise; on other devices and
dtypes, and for passes that append to a KV cache, the fast paths decline and the model's reference
runs. Every path has an equivalence test against the reference. `ANYMODAL_NATIVE=0` disables the
native kernels.
"""

from __future__ import annotations

import torch

from ..model import fast_paths
from ..model.transformer import QK_NORM_EPS, AttnMask, apply_rope
from . import attention, elementwise, torch_cpu


def _cpu_fp32(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def _on_cpu_fp32(fn):
    """`fn` for CPU fp32 inputs (judged by the first argument); None (decline) for any other."""

    def path(x, *args):
        return fn(x, *args) if _cpu_fp32(x) else None

    return path


def _native_attention(qkv, qk_norm, rot, mask: AttnMask, n_heads):
    if mask.key_valid is not None:
        return None  # padding masks: the native kernel knows only causal and document starts
    w, b = (qk_norm.weight, qk_norm.bias) if qk_norm is not None else (None, None)
    return attention.native_attention(qkv, w, b, rot, mask.key_start(), n_heads, QK_NORM_EPS)


def _blocked_attention(qkv, qk_norm, rot, mask: AttnMask, n_heads):
    hkv = (qkv.shape[2] - n_heads) // 2
    qk, v = qkv.split([n_heads + hkv, hkv], dim=2)  # [B, T, H + Hkv, hd], [B, T, Hkv, hd]
    if qk_norm is not None:
        qk = qk_norm(qk)
    qk = apply_rope(qk, rot)
    return torch_cpu.blocked_attention(qk, v, n_heads, mask.additive(qkv.dtype))  # [B, T, H·hd]


def _attention_path(native: bool):
    def attend(qkv, qk_norm, rot, mask: AttnMask, n_heads):
        b, t = qkv.shape[:2]
        # matmul attention keeps the softmax probabilities for backward: only for moderate B·H·T²
        if mask.cached or not _cpu_fp32(qkv) or b * n_heads * t * t > torch_cpu.BLOCKED_MAX_SCORES:
            return None
        if native:
            y = _native_attention(qkv, qk_norm, rot, mask, n_heads)
            if y is not None:
                return y
        return _blocked_attention(qkv, qk_norm, rot, mask, n_heads)

    return attend


def install(native: bool = True) -> dict[str, bool]:
    """Register the CPU fast paths: native kernels where they build and load (unless native=False),
    PyTorch ones otherwise. Returns which ops run a native kernel."""
    att = native and attention.load() is not None
    ew = native and elementwise.load() is not None
    fast_paths.register(
        rms_norm=_on_cpu_fp32(elementwise.rms_norm if ew else torch_cpu.RMSNormFunction.apply),
        swiglu=_on_cpu_fp32(elementwise.swiglu if ew else torch_cpu.SwiGLUFunction.apply),
        # without the native kernel the loss's own chunked function is already the fast path
        cross_entropy=_on_cpu_fp32(elementwise.cross_entropy) if ew else None,
        attention=_attention_path(att),
    )
    return {"attention": att, "swiglu": ew, "rms_norm": ew, "cross_entropy": ew}


def uninstall() -> None:
    """Remove every fast path: the model's reference runs everywhere."""
    fast_paths.register(**dict.fromkeys(fast_paths.OPS))

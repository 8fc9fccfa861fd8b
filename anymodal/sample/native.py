"""The native CPU decode step (anymodal/kernels/decode_cpu.c): built on first use, loaded with ctypes.

The C file is compiled by `anymodal.kernels.build` (once per source version and CPU feature set,
cached in the user's cache directory). Everything degrades quietly: no compiler, a failed build, a
non-x86/ARM oddity, or `ANYMODAL_NATIVE=0` simply means `native_step()` returns None and the
decoder keeps its PyTorch path (same logits, slower).
"""

from __future__ import annotations

import ctypes

from ..kernels.build import KERNEL_DIR, NativeLibrary, build_library

SOURCE = KERNEL_DIR / "decode_cpu.c"
# The per-layer weights the kernel takes, in the order of the enum in the C file.
LAYER_WEIGHTS = ("attn_norm", "mlp_norm", "wqkv", "wo", "w13", "w2", "qk_w", "qk_b")


def _declare(lib: ctypes.CDLL) -> None:
    f = lib.am_decode_step
    i64, i32, f32, p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
    f.argtypes = [i64] * 8 + [i32, i32, f32, f32] + [p, p, i64, i64, p, p, p, p, p, p, p, p, p, i64, i64, i32]
    f.restype = ctypes.c_int


_library = NativeLibrary(SOURCE, _declare, "decode kernel")


def build(force: bool = False):
    """Compile the decode kernel (if not cached) and return the library's path (RuntimeError if not)."""
    return build_library(SOURCE, force=force)


def native_step() -> ctypes.CDLL | None:
    """The loaded library (its `am_decode_step`), or None when disabled or unavailable."""
    return _library.get()


def unavailable_reason() -> str | None:
    """Why `native_step()` returned None (after it was called), for diagnostics."""
    return _library.reason

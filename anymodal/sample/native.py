"""The native CPU decode step (kernels/decode_cpu.c): built on first use, loaded with ctypes.

The C file is compiled once per source version and CPU feature set with the system C compiler
(`cc -O3 -fopenmp`, plus `-mavx2 -mfma` where the CPU has them) into the user's cache directory
(`$XDG_CACHE_HOME/anymodal/native`, else `~/.cache/...`; `ANYMODAL_NATIVE_DIR` overrides), written
atomically so concurrent first runs do not see half a library. Everything degrades quietly: no
compiler, a failed build, a non-x86/ARM oddity, or `ANYMODAL_NATIVE=0` simply means `native_step()`
returns None and the decoder keeps its PyTorch path (same logits, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "decode_cpu.c"
# The per-layer weights the kernel takes, in the order of the enum in the C file.
LAYER_WEIGHTS = ("attn_norm", "mlp_norm", "wqkv", "wo", "w13", "w2", "qk_w", "qk_b")

_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def _cache_dir() -> Path:
    if os.environ.get("ANYMODAL_NATIVE_DIR"):
        return Path(os.environ["ANYMODAL_NATIVE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anymodal" / "native"


def build(force: bool = False) -> Path:
    """Compile the kernel (if not already in the cache) and return the library's path.
    Raises RuntimeError with the compiler's message when it cannot be built."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", *_cpu_flags()]
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"decode_cpu-{key}.so"
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(str(out.parent))
    except OSError:  # read-only home (some CI runners): build into the temp dir instead
        out = Path(tempfile.gettempdir()) / f"anymodal-native-{os.getuid()}" / out.name
        if out.exists() and not force:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def native_step() -> ctypes.CDLL | None:
    """The loaded library (its `am_decode_step`), or None when disabled or unavailable."""
    global _lib, _tried, _error
    if os.environ.get("ANYMODAL_NATIVE", "1") == "0":
        return None
    if _tried:
        return _lib
    _tried = True
    try:
        import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernel shares it)

        lib = ctypes.CDLL(str(build()))
        f = lib.am_decode_step
        i64, i32, f32, p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
        f.argtypes = [i64] * 8 + [i32, i32, f32, f32] + [p, p, i64, i64, p, p, p, p, p, p, p, p, p, i64, i64, i32]
        f.restype = ctypes.c_int
        _lib = lib
    except (OSError, RuntimeError) as e:
        _error = str(e)
        log.warning("native decode kernel unavailable, using the PyTorch path: %s", e.__class__.__name__)
        log.debug("%s", e)
    return _lib


def unavailable_reason() -> str | None:
    """Why `native_step()` returned None (after it was called), for diagnostics."""
    if os.environ.get("ANYMODAL_NATIVE", "1") == "0":
        return "disabled by ANYMODAL_NATIVE=0"
    return _error

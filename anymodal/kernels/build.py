"""Compile a kernel source once per source version and CPU feature set, and cache the library.

`cc -O3 -fopenmp` (plus `-mavx2 -mfma` where the CPU has them) into the user's cache directory
(`$XDG_CACHE_HOME/anymodal/native`, else `~/.cache/...`; `ANYMODAL_NATIVE_DIR` overrides; the temp
dir when that is not writable), written atomically so concurrent first runs never load half a
library. The kernels are linked against the libgomp that PyTorch already loaded, so they share
PyTorch's thread pool instead of starting a second one.
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

KERNEL_DIR = Path(__file__).parent


def native_enabled() -> bool:
    """False when the user switched the native kernels off (`ANYMODAL_NATIVE=0`)."""
    return os.environ.get("ANYMODAL_NATIVE", "1") != "0"


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


def build_library(source: str | Path, force: bool = False) -> Path:
    """Compile `source` (if not already in the cache) and return the shared library's path.
    Raises RuntimeError with the compiler's message when it cannot be built."""
    source = Path(source)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    # no-trapping-math lets gcc if-convert and vectorize the clamps and max reductions of the loops
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *_cpu_flags()]
    # the local headers a source includes are part of its version
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
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
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {source.name} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class NativeLibrary:
    """A kernel source built and loaded on first `get()`; None (and `reason`) when unavailable.

    `declare(lib)` sets the ctypes signatures (and may raise OSError/RuntimeError/AttributeError to
    refuse the library). A failure is logged once as a warning and the caller keeps its PyTorch path."""

    def __init__(self, source: Path, declare, what: str):
        self.source, self.declare, self.what = source, declare, what
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self.tried = False

    def get(self) -> ctypes.CDLL | None:
        if not native_enabled():
            return None
        if not self.tried:
            self.tried = True
            try:
                import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernel shares it)

                lib = ctypes.CDLL(str(build_library(self.source)))
                self.declare(lib)
                self.lib = lib
            except (OSError, RuntimeError, AttributeError) as e:
                self.error = str(e)
                log.warning("native %s unavailable, using the PyTorch path: %s", self.what, e)
        return self.lib

    @property
    def reason(self) -> str | None:
        """Why `get()` returned None (after it was called)."""
        return "disabled by ANYMODAL_NATIVE=0" if not native_enabled() else self.error

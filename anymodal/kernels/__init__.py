"""Native CPU kernels (C, OpenMP), compiled with the system C compiler on first use.

- `build`: compiles and caches a kernel source, loads it (`NativeLibrary`);
- `attention`: causal training attention, forward and backward (calls PyTorch's BLAS sgemm);
- `elementwise`: fused SwiGLU, RMSNorm and cross-entropy passes;
- the decode-step kernel (decode_cpu.c) is loaded by `anymodal.sample.native`.

`install()` registers the training kernels in `anymodal.model.cpu_kernels`, where the model and
loss pick them up for CPU fp32 passes. Every kernel has a PyTorch twin with the same results, used
when no compiler is present, a build fails, or `ANYMODAL_NATIVE=0`.
"""

from __future__ import annotations


def install() -> dict[str, bool]:
    """Build/load the training kernels and register those that load; returns which are in use."""
    from ..model import cpu_kernels
    from . import attention, elementwise

    att = attention.load() is not None
    ew = elementwise.load() is not None
    cpu_kernels.register(
        attention=attention.native_attention if att else None,
        swiglu=elementwise.swiglu if ew else None,
        rms_norm=elementwise.rms_norm if ew else None,
        cross_entropy=elementwise.cross_entropy if ew else None,
    )
    return cpu_kernels.registered()


def uninstall() -> None:
    """Back to the PyTorch paths everywhere."""
    from ..model import cpu_kernels

    cpu_kernels.register(**dict.fromkeys(cpu_kernels.NAMES))

"""Optional native CPU kernels for training passes, registered from outside `anymodal.model`.

The model and loss have pure-PyTorch implementations of everything. `anymodal.kernels.install()`
(called by the trainer and the benchmarks) registers native C versions of the hot CPU fp32 passes
here, with the same math and autograd behaviour; this package never builds or loads code itself.
Each entry is None (use PyTorch) or a function:

- `attention(qkv, qk_w, qk_b, rope, key_start, n_heads, eps) -> y`: from the fused projection
  qkv [B, T, H + 2·Hkv, hd]: QK-Norm (weight/bias [H + Hkv, hd], or None), RoPE (the model's
  complex rotations [B, T, 1, hd/2]) and causal attention -> y [B, T, H·hd]; key_start [B, T]
  (first key each query may see: its packed document's start) or None;
- `swiglu(h) -> y`: silu(gate) · up of h [..., 2F] = [gate | up] -> [..., F];
- `rms_norm(x, weight, eps) -> y`: RMSNorm over the last dimension;
- `cross_entropy(x, target, inplace) -> (ce, lse)`: per row of x [N, V]; backward as in
  `loss._CrossEntropyAndLSE` (in place over x when `inplace`).
"""

from __future__ import annotations

from collections.abc import Callable

attention: Callable | None = None
swiglu: Callable | None = None
rms_norm: Callable | None = None
cross_entropy: Callable | None = None

NAMES = ("attention", "swiglu", "rms_norm", "cross_entropy")


def register(**kernels: Callable | None) -> None:
    """Set some entries (None restores the PyTorch path), e.g. register(attention=fn)."""
    for name, fn in kernels.items():
        if name not in NAMES:
            raise KeyError(f"unknown CPU kernel {name!r}; known: {', '.join(NAMES)}")
        globals()[name] = fn


def registered() -> dict[str, bool]:
    """Which entries are set."""
    return {name: globals()[name] is not None for name in NAMES}

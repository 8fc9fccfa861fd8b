"""Faster implementations of the model's ops, registered from outside `anymodal.model`.

Every module in this package computes its op in plain PyTorch: that is the reference. A module
with a replaceable op first offers the call to the registered fast path, if any; the fast path
returns its result, or None when it does not apply to those inputs (device, dtype, size, a KV
cache), and the reference runs. `anymodal.kernels.install()` registers the CPU paths (native C
kernels and hand-written PyTorch backward passes); this package never builds or loads code.

Ops and the arguments they are offered:
- `rms_norm(x, weight, eps) -> y`: RMSNorm over the last dimension;
- `swiglu(h) -> y`: silu(gate) · up of h [..., 2F] = [gate | up] -> [..., F];
- `attention(qkv, qk_norm, rot, mask, n_heads) -> y [B, T, H·hd]`: everything after the fused
  projection qkv [B, T, H + 2·Hkv, hd]: QK-Norm (the `HeadLayerNorm` module, or None), RoPE (the
  complex rotations rot [B, T, 1, hd/2]) and attention under `mask` (a `transformer.AttnMask`);
- `cross_entropy(x, target, inplace) -> (ce, lse)` per row of logits x [N, V].
"""

from __future__ import annotations

from collections.abc import Callable

OPS = ("rms_norm", "swiglu", "attention", "cross_entropy")
_registry: dict[str, Callable] = {}


def register(**fns: Callable | None) -> None:
    """Set fast paths by op name (None removes one, so the reference runs), e.g. register(swiglu=fn)."""
    for name, fn in fns.items():
        if name not in OPS:
            raise KeyError(f"unknown op {name!r}; known: {', '.join(OPS)}")
        if fn is None:
            _registry.pop(name, None)
        else:
            _registry[name] = fn


def registered() -> dict[str, Callable | None]:
    """The fast path of every op (None: the reference runs)."""
    return {name: _registry.get(name) for name in OPS}


def call(op: str, *args):
    """The registered fast path's result for these arguments, or None (no fast path, or it declined)."""
    fn = _registry.get(op)
    return None if fn is None else fn(*args)

"""The native CPU decode step: `Transformer.decode` of one token per row as one call into C.

At batch 1 a decode step is a few dozen matrix-vector products and ~150 tiny ops; in PyTorch each
tiny op costs microseconds of dispatch and the products run on one thread. The kernel
(kernels/decode_cpu.c, compiled on first use by `build`, loaded with ctypes) runs the whole step in
one call and splits the weight streaming across PyTorch's OpenMP threads. `NativeDecoder` keeps
the model's weights re-laid-out the way the kernel reads them (transposed, [in, out]).

It applies to a `Transformer` in eval mode on the CPU in fp32 (`NativeDecoder.load`), for batches
of up to `MAX_BATCH` rows (`applies`): larger batches are matmul-bound, where PyTorch's GEMM is
the better tool. Everywhere else, and when there is no C compiler, the build fails or
`ANYMODAL_NATIVE=0`, the caller falls back to `model.decode` (same logits, slower). Tests check
the kernel's logits against `Transformer.decode`.
"""

from __future__ import annotations

import ctypes

import torch

from ..model.transformer import QK_NORM_EPS
from .build import KERNEL_DIR, NativeLibrary

SOURCE = KERNEL_DIR / "decode_cpu.c"
MAX_BATCH = 16  # above this, a step is matmul-bound and PyTorch's GEMM wins
# The per-layer weights the kernel takes, in the order of the enum in the C file.
LAYER_WEIGHTS = ("attn_norm", "mlp_norm", "wqkv", "wo", "w13", "w2", "qk_w", "qk_b")


def _declare(lib: ctypes.CDLL) -> None:
    f = lib.am_decode_step
    i64, i32, f32, p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
    f.argtypes = [i64] * 8 + [i32, i32, f32, f32] + [p, p, i64, i64, p, p, p, p, p, p, p, p, p, i64, i64, i32]
    f.restype = ctypes.c_int


_library = NativeLibrary(SOURCE, _declare, "decode kernel")


def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when disabled or unavailable (see `unavailable_reason`)."""
    return _library.get()


def unavailable_reason() -> str | None:
    """Why `load()` returned None (after it was called)."""
    return _library.reason


def _has_structure(model) -> bool:
    """The Transformer layout the kernel computes (a wrapper or another model does not have it)."""
    if not all(hasattr(model, n) for n in ("tok_emb", "layers", "norm", "head", "cfg")):
        return False
    if len(model.layers) == 0:
        return False
    blk = model.layers[0]
    ok = all(hasattr(blk, n) for n in ("attn", "mlp", "attn_norm", "mlp_norm"))
    ok = ok and all(hasattr(blk.attn, n) for n in ("wqkv", "wo", "qk_norm"))
    ok = ok and all(hasattr(blk.mlp, n) for n in ("w13", "w2", "hidden"))
    return ok and not model.training and model.cfg.head_dim % 2 == 0


class NativeDecoder:
    """`step(ids, cache)` = `model.decode(ids, cache)` through the kernel, on re-laid-out weights.

    The weights are copied when the decoder is made: it computes with the model as it was then."""

    def __init__(self, model, lib: ctypes.CDLL):
        cfg = model.cfg
        self.cfg, self.lib = cfg, lib
        hd = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))  # [hd/2]
        layers = []
        with torch.no_grad():
            for blk in model.layers:
                a, m = blk.attn, blk.mlp
                layers.append(dict(
                    attn_norm=blk.attn_norm.weight.detach(), mlp_norm=blk.mlp_norm.weight.detach(),
                    wqkv=_t(a.wqkv.weight), wo=_t(a.wo.weight), w13=_t(m.w13.weight), w2=_t(m.w2.weight),
                    # [H + Hkv, hd]: q heads then k heads
                    qk_w=a.qk_norm.weight.detach() if a.qk_norm is not None else None,
                    qk_b=a.qk_norm.bias.detach() if a.qk_norm is not None else None,
                ))
            # factored code rows summed once; a blind_decode model reads its codes without the first factor
            self.emb = model.decode_table().detach().contiguous()  # [V, D]
            self.norm = model.norm.weight.detach()  # [D]
            self.head = _t(model.head_weight())  # [D, V]
        self.qk_norm = layers[0]["qk_w"] is not None
        self._layers = layers  # the kernel reads these tensors through the pointers below
        ptrs = [L[k].data_ptr() if L[k] is not None else None for L in layers for k in LAYER_WEIGHTS]
        self._layer_ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)

    @classmethod
    def load(cls, model) -> NativeDecoder | None:
        """A decoder for `model` when the kernel loads and the model is a CPU fp32 Transformer in
        eval mode; None otherwise (decode with `model.decode`)."""
        if not _has_structure(model):
            return None
        p = next(model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32:
            return None
        lib = load()
        return cls(model, lib) if lib is not None else None

    @staticmethod
    def applies(cache) -> bool:
        """Whether steps on this cache can run in the kernel: a CPU fp32 cache of <= MAX_BATCH rows."""
        return cache.batch <= MAX_BATCH and cache.k.device.type == "cpu" and cache.k.dtype == torch.float32

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache, vocab: tuple[int, int] | None = None) -> torch.Tensor:
        """ids [B, 1] -> logits [B, V] of the next token; writes keys/values at slot `cache.length`.

        vocab=(lo, hi): only ids in [lo, hi) can be chosen next (the grammar says so), so only those
        rows of the output head are computed; the other logits are -inf. At batch 1 the head is a
        seventh of the weights streamed per token; an image code needs a quarter of it."""
        cfg, B, V = self.cfg, ids.shape[0], self.head.shape[1]
        lo, hi = vocab if vocab is not None else (0, V)
        cache.check_room(1)
        slot, pos = cache.length, cache.next_pos.contiguous()  # pos [B]
        cache.valid[:, slot] = True
        ids = ids[:, 0].contiguous()  # [B]
        assert cache.k.is_contiguous() and cache.v.is_contiguous() and cache.valid.is_contiguous()
        logits = torch.empty(B, V, dtype=torch.float32)
        rc = self.lib.am_decode_step(
            B, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden, V,
            int(cfg.norm_placement == "swin"), int(self.qk_norm), cfg.norm_eps, QK_NORM_EPS,
            ids.data_ptr(), pos.data_ptr(), slot, cache.max_len,
            cache.valid.data_ptr() if cache.padded else None,
            cache.k.data_ptr(), cache.v.data_ptr(),
            self.emb.data_ptr(), self._layer_ptrs, self.norm.data_ptr(), self.head.data_ptr(),
            self.inv_freq.data_ptr(), logits.data_ptr(), lo, hi, torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("native decode step could not allocate its scratch buffers") if rc == 1 \
                else ValueError(f"bad vocabulary slice [{lo}, {hi}) for {V} logits")
        cache.next_pos = pos + 1
        cache.length = slot + 1
        return logits


def _t(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> contiguous [in, out]: the kernel splits the output columns across threads."""
    return w.detach().t().contiguous()

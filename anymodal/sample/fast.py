"""A lean single-token decode step for `anymodal.model.Transformer` (the sampling hot loop).

`Transformer.decode` is general (any T, packed documents, training paths) and runs ~40 small ops
and ~15 module calls per layer. Decoding one token per row needs far less; this step computes the
same function with about 20 plain tensor calls per layer and no module dispatch:

- q and k are QK-normed with one `layer_norm` + one `addcmul` over the concatenated heads;
- RoPE is one complex multiply (the model stores q/k head dims in rotate-half pair order);
- residual adds are fused into `addmm`; on CPU the projection weights are kept transposed and
  contiguous, which makes the one-row matmuls (GEMV) faster;
- the cos/sin rotation for the step is computed once and shared by all layers; RMSNorm runs as
  one native LayerNorm (of [x, -x], which equals RMSNorm exactly);
- the cache is the model's preallocated `KVCache` (same fields: `valid`, `next_pos`, `length`),
  so the engine's CFG bookkeeping works unchanged, and no mask is built unless rows are padded.

On CPU in fp32, for batches up to `NATIVE_MAX_BATCH` rows, the whole step is one call into the
native kernel (`native.py`, kernels/decode_cpu.c): the weight streaming is split across the threads
and nothing is dispatched per op, which at batch 1 is what decode time is made of. Larger batches
are matmul-bound, where PyTorch's GEMM is the better tool, so they take the tensor path above.

`FastDecoder.supports(model)` says whether a model has the expected structure; otherwise the
engine simply calls `model.decode`. Tests check the logits of both paths against `Transformer.decode`.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ..model.transformer import QK_NORM_EPS
from . import native

NATIVE_MAX_BATCH = 16  # above this, a step is matmul-bound and PyTorch's GEMM wins


class FastDecoder:
    """Holds re-laid-out weights of one Transformer; `step(ids, cache)` = `model.decode(ids, cache)`."""

    def __init__(self, model, use_native: bool = True):
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        self.h, self.hkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.swin = cfg.norm_placement == "swin"
        self.eps = cfg.norm_eps
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.transposed = p.device.type == "cpu"  # contiguous [in, out] weights: faster GEMV on CPU
        hd = self.hd
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=self.device) / hd))
        self.inv_freq = inv_freq  # [hd/2]
        self.layers = []
        with torch.no_grad():
            for blk in model.layers:
                a, m = blk.attn, blk.mlp
                w = a.wqkv.weight.detach()  # rows: q | k | v, q/k head dims in pair order
                if a.qk_norm is not None:  # [H + Hkv, hd]: q heads then k heads
                    nw, nb = a.qk_norm.weight.detach(), a.qk_norm.bias.detach()
                else:
                    nw = nb = None
                self.layers.append(dict(
                    attn_norm=blk.attn_norm.weight.detach(), mlp_norm=blk.mlp_norm.weight.detach(),
                    wqkv=self._w(w), wo=self._w(a.wo.weight.detach()), w13=self._w(m.w13.weight.detach()),
                    w2=self._w(m.w2.weight.detach()), qk_w=nw, qk_b=nb, hidden=m.hidden,
                ))
            self.emb = model.tok_emb.weight.detach()
            self.norm = model.norm.weight.detach()
            self.head = self._w(model.head.weight.detach())
        self.lib = native.native_step() if use_native and self.transposed and self.dtype == torch.float32 else None
        if self.lib is not None:
            ptrs = [L[k].data_ptr() if L[k] is not None else None for L in self.layers for k in native.LAYER_WEIGHTS]
            self._layer_ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)

    @staticmethod
    def supports(model) -> bool:
        needed = ("tok_emb", "layers", "norm", "head", "cfg")
        if not all(hasattr(model, n) for n in needed) or len(model.layers) == 0:
            return False
        blk = model.layers[0]
        ok = all(hasattr(blk, n) for n in ("attn", "mlp", "attn_norm", "mlp_norm"))
        ok = ok and all(hasattr(blk.attn, n) for n in ("wqkv", "wo", "qk_norm"))
        ok = ok and all(hasattr(blk.mlp, n) for n in ("w13", "w2", "hidden"))
        return ok and not model.training and model.cfg.head_dim % 2 == 0

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x [B, D], as the model's (fp32 statistics, then the weight).

        On CPU `F.rms_norm` decomposes into ~8 small ops; LayerNorm is one native kernel, and the
        LayerNorm of [x, -x] is exactly x / sqrt(mean(x²) + eps) (its mean is 0, its variance
        mean(x²)), so that is what runs here."""
        d = x.shape[-1]
        if x.dtype == torch.float32:
            return F.layer_norm(torch.cat([x, -x], -1), (2 * d,), eps=self.eps)[:, :d] * w
        return F.rms_norm(x.float(), (d,), eps=self.eps).to(x.dtype) * w

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        return w.t().contiguous() if self.transposed else w

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w if self.transposed else F.linear(x, w)

    def _addmm(self, res: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.addmm(res, x, w) if self.transposed else torch.addmm(res, x, w.t())

    def _layer_views(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer views of the cache tensors, made once per cache (indexing costs per call)."""
        if getattr(self, "_views_of", None) is not cache.k:
            self._views = [(cache.k[i], cache.v[i]) for i in range(len(self.layers))]
            self._views_of = cache.k
        return self._views

    def _native_step(self, ids: torch.Tensor, cache, lo: int, hi: int) -> torch.Tensor:
        cfg, B = self.cfg, ids.shape[0]
        cache.check_room(1)
        slot, pos = cache.length, cache.next_pos.contiguous()
        cache.valid[:, slot] = True
        ids = ids[:, 0].contiguous()
        assert cache.k.is_contiguous() and cache.v.is_contiguous() and cache.valid.is_contiguous()
        logits = torch.empty(B, self.head.shape[1], dtype=torch.float32)
        rc = self.lib.am_decode_step(
            B, cfg.dim, cfg.n_layers, self.h, self.hkv, self.hd, cfg.mlp_hidden, self.head.shape[1],
            int(self.swin), int(self.layers[0]["qk_w"] is not None), self.eps, QK_NORM_EPS,
            ids.data_ptr(), pos.data_ptr(), slot, cache.max_len,
            cache.valid.data_ptr() if cache.padded else None,
            cache.k.data_ptr(), cache.v.data_ptr(),
            self.emb.data_ptr(), self._layer_ptrs, self.norm.data_ptr(), self.head.data_ptr(),
            self.inv_freq.data_ptr(), logits.data_ptr(), lo, hi, torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("native decode step could not allocate its scratch buffers") if rc == 1 \
                else ValueError(f"bad vocabulary slice [{lo}, {hi}) for {self.head.shape[1]} logits")
        cache.next_pos = pos + 1
        cache.length = slot + 1
        return logits

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache, vocab: tuple[int, int] | None = None) -> torch.Tensor:
        """ids [B, 1] -> logits [B, V] of the next token; writes keys/values at slot `cache.length`.

        vocab=(lo, hi): only ids in [lo, hi) can be chosen next (the grammar says so), so only those
        rows of the output head are computed; the other logits are -inf. At batch 1 the head is a
        seventh of the weights streamed per token; an image code needs a quarter of it."""
        B, V = ids.shape[0], self.head.shape[1]
        lo, hi = vocab if vocab is not None else (0, V)
        if self.lib is not None and B <= NATIVE_MAX_BATCH and ids.device.type == "cpu" and cache.k.dtype == torch.float32:
            return self._native_step(ids, cache, lo, hi)
        h, hkv, hd = self.h, self.hkv, self.hd
        slot = cache.length
        cache.check_room(1)
        pos = cache.next_pos  # [B]
        freqs = pos[:, None].to(torch.float32) * self.inv_freq  # [B, hd/2]
        rot = torch.polar(torch.ones_like(freqs), freqs)[:, None, :]  # [B, 1, hd/2] complex
        cache.valid[:, slot] = True
        mask = cache.valid[:, None, None, : slot + 1] if cache.padded else None  # [B, 1, 1, S]
        x = self.emb[ids[:, 0]]  # [B, D]
        fp32 = x.dtype == torch.float32
        kv = self._layer_views(cache)
        for li, L in enumerate(self.layers):
            hin = x if self.swin else self._rms(x, L["attn_norm"])
            qkv = self._mm(hin, L["wqkv"])  # [B, (h + 2 hkv) hd]
            qk = qkv[:, : (h + hkv) * hd].view(B, h + hkv, hd)
            v = qkv[:, (h + hkv) * hd:].view(B, hkv, hd)
            if L["qk_w"] is not None:
                qk = torch.addcmul(L["qk_b"], F.layer_norm(qk, (hd,), eps=QK_NORM_EPS), L["qk_w"])
            if fp32:
                qk = torch.view_as_real(torch.view_as_complex(qk.view(B, h + hkv, hd // 2, 2)) * rot)
            else:  # complex multiply in fp32
                qk = torch.view_as_real(torch.view_as_complex(qk.float().view(B, h + hkv, hd // 2, 2)) * rot)
                qk = qk.to(x.dtype)
            qk = qk.view(B, h + hkv, hd)
            kl, vl = kv[li]  # [B, hkv, S, hd] views of this layer's cache
            kl.select(2, slot).copy_(qk[:, h:])
            vl.select(2, slot).copy_(v)
            y = F.scaled_dot_product_attention(
                qk[:, :h, None], kl[:, :, : slot + 1], vl[:, :, : slot + 1], attn_mask=mask, enable_gqa=hkv != h,
            )  # [B, h, 1, hd]
            y = y.reshape(B, h * hd)
            if self.swin:
                x = x + self._rms(self._mm(y, L["wo"]), L["attn_norm"])
                gu = self._mm(x, L["w13"])
                act = F.silu(gu[:, : L["hidden"]]) * gu[:, L["hidden"]:]
                x = x + self._rms(self._mm(act, L["w2"]), L["mlp_norm"])
            else:
                x = self._addmm(x, y, L["wo"])
                gu = self._mm(self._rms(x, L["mlp_norm"]), L["w13"])
                act = F.silu(gu[:, : L["hidden"]]) * gu[:, L["hidden"]:]
                x = self._addmm(x, act, L["w2"])
        cache.next_pos = pos + 1
        cache.length = slot + 1
        if (lo, hi) == (0, V):
            return self._mm(self._rms(x, self.norm), self.head)  # [B, V]
        logits = torch.full((B, V), float("-inf"), dtype=x.dtype, device=x.device)
        head = self.head[:, lo:hi] if self.transposed else self.head[lo:hi]
        logits[:, lo:hi] = self._mm(self._rms(x, self.norm), head)  # [B, hi - lo]
        return logits

"""The decoder-only transformer: token embedding → N blocks → RMSNorm → untied output head.

The math is Chameleon's (as implemented by Hugging Face `transformers`), so weights can be exported
to `ChameleonForConditionalGeneration` and give the same logits (see `hf.py`):
- attention: rotate-half RoPE, grouped-query heads, QK-Norm (LayerNorm over head_dim with a per-head
  scale and bias, applied to q and k *before* RoPE), `F.scaled_dot_product_attention`;
- MLP: SwiGLU;
- norm placement 'pre' (Llama: x + attn(norm(x))) or 'swin' (Chameleon: x + norm(attn(x))).

For speed: q/k/v and gate/up are fused into single matmuls (`wqkv`, `w13`); the attention mask is
built once per forward (not at all for plain causal passes, where SDPA's `is_causal` is used); RoPE
is one complex multiply, for which the q/k head dimensions are stored in pair order (HF's dims i and
i + hd/2 side by side) rather than HF's half order (attention scores and QK-Norm do not depend on
the order of head dims; `hf.py` permutes the q/k rows when converting). On CPU in fp32, full-sequence
passes use `blocked_attention` (causal attention from large GEMMs, hand-written backward) instead of
SDPA's flash kernel, and RMSNorm / SwiGLU use hand-written backward passes with fewer memory passes;
where native kernels with the same math are registered in `cpu_kernels` (the trainer installs
them from anymodal.kernels; this package never builds or loads code), attention (with QK-Norm and
RoPE), SwiGLU and RMSNorm use those instead. On GPU everything goes through SDPA and PyTorch's fused kernels.

Packed sequences: `doc_ids [B, T]` restricts attention to tokens of the same document and resets
positions at each document start, so a packed row computes exactly what its documents would alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import cpu_kernels
from .config import ModelConfig
from .kv_cache import KVCache

QK_NORM_EPS = 1e-5  # Chameleon's QK LayerNorm uses a fixed eps


class _RMSNormCPU(torch.autograd.Function):
    """fp32 RMSNorm w · x / sqrt(mean(x²) + eps) with a hand-written backward.

    PyTorch's CPU rms_norm is a composite of ~6 elementwise ops whose autograd backward makes about
    twelve passes over x; this one makes seven (two of them plain reductions)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        d = x.shape[-1]
        var = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d)  # [..., 1]
        rstd = var.add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        xhat = x * rstd
        gx = g * xhat  # [..., D]
        dw = gx.reshape(-1, d).sum(0)  # [D]
        dot = (gx.reshape(-1, d) @ weight).view(rstd.shape).mul_(-1.0 / d)  # −mean(g·w·xhat) [..., 1]
        dx = torch.addcmul(g * weight, xhat, dot).mul_(rstd)
        return dx, dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu":
            if cpu_kernels.rms_norm is not None:
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            return _RMSNormCPU.apply(x, self.weight, self.eps)
        # normalize in fp32, cast back, then scale (the order HF Chameleon/Llama use)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class HeadLayerNorm(nn.Module):
    """QK-Norm: LayerNorm statistics over head_dim, with each head's own scale and bias."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, H, hd]
        x = F.layer_norm(x, (x.shape[-1],), eps=QK_NORM_EPS)
        return torch.addcmul(self.bias, x, self.weight)  # [B, T, H, hd]


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex rotations [B, T, 1, hd/2] (complex64) for integer positions [B, T]."""
    # same expression as HF's default rope init, so the angles agree bit for bit
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim)
    )
    angles = positions[..., None].float() * inv_freq  # [B, T, hd/2]
    return torch.polar(torch.ones_like(angles), angles)[:, :, None]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, T, H, hd] whose head dims are stored as (x_i, x_{i+hd/2}) pairs, see module doc.

    One complex multiply per pair: (x_i + i·x_{i+hd/2}) · e^{iθ} gives exactly HF's rotate-half
    result (x_i·cos − x_{i+hd/2}·sin, x_{i+hd/2}·cos + x_i·sin), in one kernel forward and backward.
    """
    b, t, h, hd = x.shape
    xc = torch.view_as_complex(x.float().reshape(b, t, h, hd // 2, 2))  # [B, T, H, hd/2]
    return torch.view_as_real(xc * rot).reshape(b, t, h, hd).to(x.dtype)


def interleave_perm(head_dim: int) -> torch.Tensor:
    """Our head-dim order from HF's: ours[2i] = hf[i], ours[2i+1] = hf[i + hd/2]."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


def positions_from_docs(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever doc_ids changes along the sequence."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of own doc
    return idx - first


class AttnMask(NamedTuple):
    """How a forward pass masks attention (built once per forward, shared by all layers)."""

    mask: torch.Tensor | None  # bool [B or 1, 1, T, S] for SDPA (True = may attend), or None
    causal: bool  # SDPA is_causal (only with mask None and no cached keys)
    blocked: bool  # use `blocked_attention` (or the registered CPU kernel) instead of SDPA
    bias: (
        torch.Tensor | None
    )  # additive fp [B or 1, 1, T, T] (0 / -inf) for blocked_attention with doc/padding masks
    kernel: bool = False  # cpu_kernels.attention runs instead of blocked_attention
    key_start: torch.Tensor | None = None  # [B, T] first key of each query's document, for the kernel


def doc_key_start(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the first token of each token's document (doc_ids change at document starts)."""
    b, t = doc_ids.shape
    return torch.arange(t, device=doc_ids.device).expand(b, t) - positions_from_docs(doc_ids)


ATTN_BLOCK = 128  # query rows per block in blocked_attention
BLOCKED_MAX_SCORES = 1 << 25  # B·H·T² above this: SDPA (the blocked path keeps probabilities for backward)


class _BlockedAttention(torch.autograd.Function):
    """Exact causal softmax attention from batched matmuls, one block of query rows at a time.

    Inputs are the post-RoPE heads qk [B, T, H + Hkv, hd] (q heads first) and v [B, T, Hkv, hd];
    the output is y [B, T, H·hd], ready for the output projection. Query block i only multiplies
    the keys up to its own last row, so causal attention costs (n+1)/2n of the full T² work for n
    blocks, at GEMM speed; on CPU this trains clearly faster than SDPA's flash kernel at T ≈ 512
    (whose backward runs far below matmul peak). Backward is written out by hand so gradients are
    accumulated in place (no zero-padded slice gradients, no concatenations). The softmax
    probabilities are kept for backward, so this is only used for moderate B·H·T².
    `bias` [B or 1, 1, T, T] (0 / -inf) adds document or padding masks; every row keeps its diagonal.
    """

    @staticmethod
    def forward(ctx, qk, v, n_heads: int, bias):
        b, t, hq, hd = qk.shape
        h, hkv = n_heads, hq - n_heads
        g = h // hkv
        scale = hd**-0.5
        # head-major contiguous copies [B·H, T, hd] (k/v repeated for grouped-query heads)
        q = torch.empty(b, h, t, hd, dtype=qk.dtype, device=qk.device)
        torch.mul(qk[:, :, :h].transpose(1, 2), scale, out=q)  # scale folded into the copy
        q = q.view(b * h, t, hd)
        k = qk[:, :, h:].transpose(1, 2)  # [B, Hkv, T, hd]
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.transpose(1, 2).repeat_interleave(g, dim=1)
        else:
            v = v.transpose(1, 2)
        k, v = k.reshape(b * h, t, hd), v.reshape(b * h, t, hd)
        y = torch.empty(b * h, t, hd, dtype=qk.dtype, device=qk.device)
        tri = torch.full((ATTN_BLOCK, ATTN_BLOCK), float("-inf"), device=qk.device, dtype=qk.dtype).triu_(1)
        probs = []
        for r0 in range(0, t, ATTN_BLOCK):
            r1 = min(t, r0 + ATTN_BLOCK)
            s = torch.bmm(q[:, r0:r1], k[:, :r1].transpose(1, 2))  # [BH, r, r1] vs keys 0..r1
            if bias is not None:
                s.view(-1, h, r1 - r0, r1).add_(bias[:, :, r0:r1, :r1])
            else:
                s[:, :, r0:r1].add_(tri[: r1 - r0, : r1 - r0])  # causal part of the diagonal block
            p = torch.softmax(s, dim=-1)
            torch.bmm(p, v[:, :r1], out=y[:, r0:r1])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.dims = (b, t, h, hkv, hd)
        return y.view(b, h, t, hd).transpose(1, 2).reshape(b, t, h * hd)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, *probs = ctx.saved_tensors
        b, t, h, hkv, hd = ctx.dims
        dy = dy.view(b, t, h, hd).transpose(1, 2).reshape(b * h, t, hd)  # [BH, T, hd]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # last block first: it sees every key, so it initializes dk/dv; earlier blocks add to a prefix
        # (through a contiguous temporary: in-place baddbmm on a strided prefix falls back to a slow loop)
        for i in reversed(range(len(probs))):
            p = probs[i]
            r0 = i * ATTN_BLOCK
            r1 = r0 + p.shape[1]
            do = dy[:, r0:r1]  # [BH, r, hd]
            dp = torch.bmm(do, v[:, :r1].transpose(1, 2))  # [BH, r, r1]
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # d scores
            torch.bmm(ds, k[:, :r1], out=dq[:, r0:r1])
            if r1 == t:
                torch.bmm(p.transpose(1, 2), do, out=dv)
                torch.bmm(ds.transpose(1, 2), q[:, r0:r1], out=dk)
            else:
                dv[:, :r1] += torch.bmm(p.transpose(1, 2), do)
                dk[:, :r1] += torch.bmm(ds.transpose(1, 2), q[:, r0:r1])
        scale = hd**-0.5
        dqk = torch.empty(b, t, h + hkv, hd, dtype=dq.dtype, device=dq.device)
        torch.mul(dq.view(b, h, t, hd).transpose(1, 2), scale, out=dqk[:, :, :h])  # q was pre-scaled
        g = h // hkv
        dk = dk.view(b, hkv, g, t, hd).sum(2) if g > 1 else dk.view(b, h, t, hd)  # sum over each group
        dv = dv.view(b, hkv, g, t, hd).sum(2) if g > 1 else dv.view(b, h, t, hd)
        dqk[:, :, h:] = dk.transpose(1, 2)
        return dqk, dv.transpose(1, 2), None, None


def blocked_attention(qk: torch.Tensor, v: torch.Tensor, n_heads: int, bias: torch.Tensor | None = None):
    """y [B, T, H·hd] from post-RoPE qk [B, T, H + Hkv, hd] and v [B, T, Hkv, hd] (see _BlockedAttention)."""
    return _BlockedAttention.apply(qk, v, n_heads, bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, cfg.q_dim + 2 * cfg.kv_dim, bias=False)  # rows: q | k | v
        self.wo = nn.Linear(cfg.q_dim, cfg.dim, bias=False)
        # QK-Norm of the q heads and the k heads in one call: heads [0, H) are q, [H, H + Hkv) are k
        self.qk_norm = HeadLayerNorm(cfg.n_heads + cfg.n_kv_heads, cfg.head_dim) if cfg.qk_norm else None

    def forward(self, x, rot, am: AttnMask, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(b, t, h + 2 * hkv, hd)
        if am.kernel:  # QK-Norm, RoPE and attention in one native op
            w, bias = (self.qk_norm.weight, self.qk_norm.bias) if self.qk_norm is not None else (None, None)
            y = cpu_kernels.attention(qkv, w, bias, rot, am.key_start, h, QK_NORM_EPS)  # [B, T, H·hd]
            return self.wo(y)
        qk, v = qkv.split([h + hkv, hkv], dim=2)  # [B, T, H + Hkv, hd], [B, T, Hkv, hd]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = apply_rope(qk, rot)  # [B, T, H + Hkv, hd]
        if am.blocked:
            return self.wo(blocked_attention(qk, v, h, am.bias))  # [B, T, D]
        q, k = qk.split([h, hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, hd]
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [B, Hkv, S, hd]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=am.mask, is_causal=am.causal, enable_gqa=hkv != h
        )  # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).reshape(b, t, h * hd))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) · up on the fused projection h = [gate | up] [..., 2F] → [..., F].

    Same math as autograd's, but the gradient of h is written into one buffer (no concatenation
    of the two halves' gradients in backward)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor):
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, g):
        gate, up, act = ctx.saved_tensors
        f = gate.shape[-1]
        dh = torch.empty(*gate.shape[:-1], 2 * f, dtype=g.dtype, device=g.device)
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=dh[..., :f])
        torch.mul(g, act, out=dh[..., f:])
        return dh


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.mlp_hidden
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.mlp_hidden, bias=False)  # rows: gate | up
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13(x)  # [B, T, 2·hidden]
        if cpu_kernels.swiglu is not None and h.device.type == "cpu" and h.dtype == torch.float32:
            return self.w2(cpu_kernels.swiglu(h))  # [B, T, hidden] -> [B, T, D]
        return self.w2(_SwiGLU.apply(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.swin = cfg.norm_placement == "swin"
        self.attn = Attention(cfg, layer_id)
        self.mlp = MLP(cfg)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # HF: input_layernorm
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # HF: post_attention_layernorm
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, rope, am: AttnMask, cache: KVCache | None = None) -> torch.Tensor:
        if self.swin:  # Chameleon-34B: normalize the branch output, not its input
            h = x + self.drop(self.attn_norm(self.attn(x, rope, am, cache)))
            return h + self.drop(self.mlp_norm(self.mlp(h)))
        h = x + self.drop(self.attn(self.attn_norm(x), rope, am, cache))
        return h + self.drop(self.mlp(self.mlp_norm(h)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2·n_layers)
        so the residual stream's variance does not grow with depth (GPT-2 / Megatron)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            elif p.dim() == 2 and "norm" not in name:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint or bundle stores: the state dict, without the head when it is
        the embedding (tied), so every stored tensor has memory of its own (safetensors needs that)."""
        state = self.state_dict()
        if self.cfg.tie_embeddings:
            state.pop("head.weight", None)
        return state

    def load_weights(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load `weights()` (or a full state dict); returns (missing, unexpected) keys."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if self.cfg.tie_embeddings:
            missing = [k for k in missing if k != "head.weight"]
        return missing, unexpected

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    # ---------------------------------------------------------------------------------------------
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for token ids [B, T].

        positions [B, T]: RoPE positions; default: derived from doc_ids / attention_mask / the cache.
        doc_ids [B, T]: packed documents (attend within the same id only, causally). No cache.
        cache: append this step's keys/values and attend to everything cached before.
        attention_mask [B, T] bool: False marks left padding (never attended to).
        """
        b, t = ids.shape
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed training rows) cannot be combined with a KV cache")
        past = 0
        if cache is not None:
            cache.check_room(t)
            past = cache.length
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        if positions is None:
            if doc_ids is not None:
                positions = positions_from_docs(doc_ids)
            elif attention_mask is not None:  # left padding: first real token gets position 0
                positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_(min=0)
            else:
                positions = torch.arange(t, device=ids.device).expand(b, t)
            if cache is not None:
                positions = positions + cache.next_pos[:, None]
        x = self.tok_emb(ids)  # [B, T, D]
        blocked = (  # CPU fp32 full-sequence passes of moderate size: matmul attention (see above)
            self.cfg.attention == "auto"
            and cache is None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and b * self.cfg.n_heads * t * t <= BLOCKED_MAX_SCORES
        )
        if blocked and attention_mask is None and cpu_kernels.attention is not None:
            # causal within each document: the kernel needs only where each query's document starts
            key_start = doc_key_start(doc_ids) if doc_ids is not None else None
            am = AttnMask(None, False, True, None, kernel=True, key_start=key_start)
        else:
            mask, causal = self._attention_mask(b, t, past, doc_ids, attention_mask, cache)
            bias = None
            if blocked and mask is not None:  # additive form, once for all layers
                bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
            am = AttnMask(mask, causal, blocked, bias)
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)  # [B, T, 1, hd/2]
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                x = checkpoint(layer, x, rope, am, None, use_reentrant=False)
            else:
                x = layer(x, rope, am, cache)
        if cache is not None:
            valid = attention_mask if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is not None and not cache.padded:
                cache.padded = not bool(attention_mask.all())
            cache.advance(valid, positions[:, -1])
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))  # [B, T, V]

    def _attention_mask(self, b, t, past, doc_ids, attention_mask, cache):
        """(mask, is_causal) for SDPA; a bool mask [B, 1, T, past+T] only when one is needed."""
        padded = attention_mask is not None or (cache is not None and cache.padded)
        if doc_ids is None and not padded:
            if past == 0:
                return None, True  # plain causal training / first prefill: SDPA's fast path
            if t == 1:
                return None, False  # one new token attends to everything cached
        dev = (
            doc_ids.device
            if doc_ids is not None
            else (attention_mask if attention_mask is not None else cache.valid).device
        )
        q_idx = torch.arange(past, past + t, device=dev)
        k_idx = torch.arange(past + t, device=dev)
        allowed = (k_idx[None, :] <= q_idx[:, None])[None]  # [1, T, S] causal
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, T, T]
        if padded:
            new_valid = (
                attention_mask
                if attention_mask is not None
                else torch.ones(b, t, dtype=torch.bool, device=dev)
            )
            key_valid = new_valid if cache is None else torch.cat([cache.valid[:, :past], new_valid], dim=1)
            # a padding query still sees itself, so its row is never empty (no NaN from softmax)
            allowed = (allowed & key_valid[:, None, :]) | (k_idx[None, :] == q_idx[:, None])[None]
        return allowed[:, None], False  # [B or 1, 1, T, S]

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run a (left-padded) prompt batch ids [B, T] into the cache; logits of the last position [B, V]."""
        return self.forward(
            ids, positions=positions, cache=cache, attention_mask=attention_mask, last_only=True
        )[:, -1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row ids [B, 1]; logits [B, V] for the token after it."""
        return self.forward(ids, cache=cache, last_only=True)[:, -1]

"""The decoder-only transformer: token embedding → N blocks → RMSNorm → untied output head.

The math is Chameleon's (as implemented by Hugging Face `transformers`), so weights can be exported
to `ChameleonForConditionalGeneration` and give the same logits (see `hf.py`):
- attention: rotate-half RoPE, grouped-query heads, QK-Norm (LayerNorm over head_dim with a per-head
  scale and bias, applied to q and k *before* RoPE), `F.scaled_dot_product_attention`;
- MLP: SwiGLU;
- norm placement 'pre' (Llama: x + attn(norm(x))) or 'swin' (Chameleon: x + norm(attn(x))).

Two layout choices make it faster without changing the math: q/k/v and gate/up are fused into
single matmuls (`wqkv`, `w13`), and RoPE is one complex multiply, for which the q/k head dimensions
are stored in pair order (HF's dims i and i + hd/2 side by side) rather than HF's half order
(attention scores and QK-Norm do not depend on the order of head dims; `hf.py` permutes the q/k rows
when converting). The attention mask is described once per forward (`AttnMask`) and only built as
a tensor when a pass needs one.

This file is the reference. RMSNorm, SwiGLU and attention offer their inputs to `fast_paths` first,
where faster implementations (the CPU kernels of `anymodal.kernels`) can be registered from outside.

Packed sequences: `doc_ids [B, T]` restricts attention to tokens of the same document and resets
positions at each document start, so a packed row computes exactly what its documents would alone.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast_paths
from .config import ModelConfig
from .kv_cache import KVCache

QK_NORM_EPS = 1e-5  # Chameleon's QK LayerNorm uses a fixed eps


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (y := fast_paths.call("rms_norm", x, self.weight, self.eps)) is not None:
            return y
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


def doc_key_start(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the first token of each token's document (doc_ids change at document starts)."""
    b, t = doc_ids.shape
    return torch.arange(t, device=doc_ids.device).expand(b, t) - positions_from_docs(doc_ids)


class AttnMask:
    """Which keys each query of one forward pass may attend to; built once, shared by all layers.

    Always causal; with `doc_ids` [B, T] only within the query's own packed document; with
    `key_valid` [B, S] never to a key marked False (left padding). S = past + T: the keys already in
    the KV cache, then this pass's. `cached` says this pass appends to a KV cache.
    """

    def __init__(self, t: int, past: int, cached: bool, device: torch.device, doc_ids=None, key_valid=None):
        self.t, self.past, self.cached, self.device = t, past, cached, device
        self.doc_ids = doc_ids  # [B, T] or None
        self.key_valid = key_valid  # [B, S] bool or None
        self._sdpa: tuple[torch.Tensor | None, bool] | None = None
        self._additive: torch.Tensor | None = None
        self._key_start: torch.Tensor | None = None

    def sdpa(self) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for SDPA: a bool mask [B or 1, 1, T, S] (True = may attend) only
        when one is needed, built on first use and then kept for the other layers."""
        if self._sdpa is None:
            self._sdpa = self._build()
        return self._sdpa

    def _build(self) -> tuple[torch.Tensor | None, bool]:
        t, past, doc_ids, key_valid = self.t, self.past, self.doc_ids, self.key_valid
        if doc_ids is None and key_valid is None:
            if past == 0:
                return None, True  # plain causal training / first prefill: SDPA's fast path
            if t == 1:
                return None, False  # one new token attends to everything cached
        q_idx = torch.arange(past, past + t, device=self.device)
        k_idx = torch.arange(past + t, device=self.device)
        allowed = (k_idx[None, :] <= q_idx[:, None])[None]  # [1, T, S] causal
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, T, T]
        if key_valid is not None:
            # a padding query still sees itself, so its row is never empty (no NaN from softmax)
            allowed = (allowed & key_valid[:, None, :]) | (k_idx[None, :] == q_idx[:, None])[None]
        return allowed[:, None], False  # [B or 1, 1, T, S]

    def additive(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as an additive bias (0 / -inf) [B or 1, 1, T, S], or None for plain causal."""
        mask, _ = self.sdpa()
        if mask is None:
            return None
        if self._additive is None or self._additive.dtype != dtype:
            self._additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return self._additive

    def key_start(self) -> torch.Tensor | None:
        """[B, T] index of the first key each query may see (its document's start), or None."""
        if self.doc_ids is not None and self._key_start is None:
            self._key_start = doc_key_start(self.doc_ids)
        return self._key_start


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.fast_path_allowed = cfg.attention == "auto"
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, cfg.q_dim + 2 * cfg.kv_dim, bias=False)  # rows: q | k | v
        self.wo = nn.Linear(cfg.q_dim, cfg.dim, bias=False)
        # QK-Norm of the q heads and the k heads in one call: heads [0, H) are q, [H, H + Hkv) are k
        self.qk_norm = HeadLayerNorm(cfg.n_heads + cfg.n_kv_heads, cfg.head_dim) if cfg.qk_norm else None

    def forward(self, x, rot, mask: AttnMask, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(b, t, h + 2 * hkv, hd)  # [B, T, H + 2·Hkv, hd]
        if self.fast_path_allowed:
            y = fast_paths.call("attention", qkv, self.qk_norm, rot, mask, h)  # [B, T, H·hd] or None
            if y is not None:
                return self.wo(y)
        qk, v = qkv.split([h + hkv, hkv], dim=2)  # [B, T, H + Hkv, hd], [B, T, Hkv, hd]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = apply_rope(qk, rot)  # [B, T, H + Hkv, hd]
        q, k = qk.split([h, hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, hd]
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [B, Hkv, S, hd]
        attn_mask, is_causal = mask.sdpa()
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=hkv != h
        )  # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).reshape(b, t, h * hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.mlp_hidden
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.mlp_hidden, bias=False)  # rows: gate | up
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13(x)  # [B, T, 2·hidden]
        y = fast_paths.call("swiglu", h)
        if y is None:
            gate, up = h.chunk(2, dim=-1)
            y = F.silu(gate) * up  # [B, T, hidden]
        return self.w2(y)  # [B, T, D]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.swin = cfg.norm_placement == "swin"
        self.attn = Attention(cfg, layer_id)
        self.mlp = MLP(cfg)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # HF: input_layernorm
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # HF: post_attention_layernorm
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, rot, mask: AttnMask, cache: KVCache | None = None) -> torch.Tensor:
        if self.swin:  # Chameleon-34B: normalize the branch output, not its input
            h = x + self.drop(self.attn_norm(self.attn(x, rot, mask, cache)))
            return h + self.drop(self.mlp_norm(self.mlp(h)))
        h = x + self.drop(self.attn(self.attn_norm(x), rot, mask, cache))
        return h + self.drop(self.mlp(self.mlp_norm(h)))


class CodeFactors(nn.Module):
    """Embedding rows of a block of code ids built from their factors: code c's row is the sum of
    one row per factor, picked by c's digits in the mixed radix `cfg.code_factors` (least
    significant first). An image tokenizer whose codes are (colour, shape part) pairs gives a
    colour table and a shape-part table: a code no training image contained, whose colour and
    shape part were both seen on other codes, has a trained row; tied, its output logit is the sum
    of its factors' logits, so no row of its own is pushed down for never being the answer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.offset, self.count = cfg.code_offset, math.prod(cfg.code_factors)
        self.tables = nn.ParameterList(nn.Parameter(torch.zeros(n, cfg.dim)) for n in cfg.code_factors)
        codes, digits, stride = torch.arange(self.count), [], 1
        for n in cfg.code_factors:
            digits.append(codes // stride % n)
            stride *= n
        self.register_buffer("digits", torch.stack(digits), persistent=False)  # [factors, count]

    def rows(self) -> torch.Tensor:
        return sum(t[d] for t, d in zip(self.tables, self.digits))  # [count, D]

    def table(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [V, D] with the code block's rows replaced by their factors' sums."""
        a, b = self.offset, self.offset + self.count
        return torch.cat([weight[:a], self.rows().to(weight.dtype), weight[b:]])  # [V, D]

    def first_block(self) -> torch.Tensor:
        """Each code's first-factor row: [count, D]."""
        return self.tables[0][self.digits[0]]

    def first_rows(self, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> the row of each code's first factor where `where` [B, T] holds and the id is
        a code, else zeros: [B, T, D]."""
        rel = ids - self.offset
        where = where & (rel >= 0) & (rel < self.count)
        rows = self.tables[0][self.digits[0][rel.clamp(0, self.count - 1)]]  # [B, T, D]: only the rows used
        return rows * where.unsqueeze(-1).to(rows.dtype)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.code_factors = CodeFactors(cfg) if cfg.code_factors else None
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
        if self.code_factors is not None:  # a code's row is a sum of factor rows: the sum has std init_std
            for t in self.code_factors.tables:
                nn.init.normal_(t, 0.0, std / math.sqrt(len(self.code_factors.tables)))
            f = self.code_factors  # the table's own rows of the block are never read
            self.tok_emb.weight[f.offset:f.offset + f.count].zero_()

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

    def embedding_table(self) -> torch.Tensor:
        """The input embedding [V, D] (tied: the output rows too), the code block's rows built from
        their factors where `code_factors` is on."""
        w = self.tok_emb.weight
        return w if self.code_factors is None else self.code_factors.table(w)

    def decode_table(self) -> torch.Tensor:
        """The rows a decode step reads its token from [V, D]: the embedding table, and with
        cfg.blind_decode each code's row without its first factor's."""
        w = self.embedding_table()
        if not self.cfg.blind_decode:
            return w
        f = self.code_factors
        a, b = f.offset, f.offset + f.count
        return torch.cat([w[:a], w[a:b] - f.first_block(), w[b:]])  # [V, D]

    def head_weight(self) -> torch.Tensor:
        """The output head's rows [V, D] (tied factored codes: their factor sums)."""
        return self.embedding_table() if self.code_factors is not None and self.cfg.tie_embeddings \
            else self.head.weight

    @torch.no_grad()
    def fold_code_factors(self) -> Transformer:
        """The same function as a plain model (factor sums written into the table; tied, that is the
        head too): what bundles and the Hugging Face export store. A blind_decode model folds into one
        that reads its own codes whole (the same logits on any given sequence, not in decode)."""
        if self.code_factors is None:
            return self
        cfg = dataclasses.replace(self.cfg, code_factors=[], code_offset=0, blind_decode=False)
        plain = Transformer(cfg).to(self.tok_emb.weight.device, self.tok_emb.weight.dtype)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("code_factors.")}
        state["tok_emb.weight"] = self.embedding_table()
        if cfg.tie_embeddings:
            state.pop("head.weight", None)
        plain.load_weights(state)
        return plain.train(self.training)

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
        drop_first_factor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for token ids [B, T].

        positions [B, T]: RoPE positions; default: derived from doc_ids / attention_mask / the cache.
        doc_ids [B, T]: packed documents (attend within the same id only, causally). No cache.
        cache: append this step's keys/values and attend to everything cached before.
        attention_mask [B, T] bool: False marks left padding (never attended to).
        drop_first_factor [B, T] bool: these code positions are embedded without their first factor's
        row (with (colour, structure) image codes: as their structure alone). Needs code_factors.
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
        table = self.embedding_table() if self.code_factors is not None else None  # [V, D]
        x = self.tok_emb(ids) if table is None else F.embedding(ids, table)  # [B, T, D]
        if drop_first_factor is not None:
            if self.code_factors is None:
                raise ValueError("drop_first_factor needs a model with code_factors")
            x = x - self.code_factors.first_rows(ids, drop_first_factor.to(torch.bool))  # [B, T, D]
        mask = self._mask(b, t, past, doc_ids, attention_mask, cache, ids.device)
        rot = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)  # [B, T, 1, hd/2]
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                x = checkpoint(layer, x, rot, mask, None, use_reentrant=False)
            else:
                x = layer(x, rot, mask, cache)
        if cache is not None:
            valid = attention_mask if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is not None and not cache.padded:
                cache.padded = not bool(attention_mask.all())
            cache.advance(valid, positions[:, -1])
        if last_only:
            x = x[:, -1:]
        if table is not None and self.cfg.tie_embeddings:
            return F.linear(self.norm(x), table)  # [B, T, V]: the output rows are the same rows
        return self.head(self.norm(x))  # [B, T, V]

    def _mask(self, b, t, past, doc_ids, attention_mask, cache, device) -> AttnMask:
        """This pass's AttnMask: which keys are padding, from attention_mask and the cache's record."""
        key_valid = None
        if attention_mask is not None or (cache is not None and cache.padded):
            new_valid = (
                attention_mask
                if attention_mask is not None
                else torch.ones(b, t, dtype=torch.bool, device=device)
            )
            key_valid = new_valid if cache is None else torch.cat([cache.valid[:, :past], new_valid], dim=1)
        return AttnMask(t, past, cache is not None, device, doc_ids, key_valid)

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
        """One new token per row ids [B, 1]; logits [B, V] for the token after it. With
        cfg.blind_decode a code is read without its first factor (`forward`'s drop_first_factor)."""
        blind = torch.ones_like(ids, dtype=torch.bool) if self.cfg.blind_decode else None
        return self.forward(ids, cache=cache, last_only=True, drop_first_factor=blind)[:, -1]

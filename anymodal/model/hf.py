"""Mapping to Hugging Face `transformers` Chameleon (text path): config keys and weight names.

Pure torch: transformers is imported only inside `hf_chameleon`, which builds the HF model the
parity test and the benchmarks compare against. Our fused projections are split back into HF's:
`wqkv` → q_proj | k_proj | v_proj, `w13` → gate_proj | up_proj, `qk_norm` → q_norm | k_norm. Our q/k
head dims are stored in RoPE pair order (see transformer.py); they are permuted to HF's half order
here (and back in `from_hf_state_dict`). Used by `anymodal.hf` (export, init_from), the parity test
and the benchmarks.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .transformer import interleave_perm


def _heads_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows (or entries) grouped by head, each head's dims from our pair order to HF's half order."""
    inv = torch.argsort(interleave_perm(head_dim))
    return w.reshape(n_heads, head_dim, -1)[:, inv].reshape(w.shape)


def _heads_from_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    return w.reshape(n_heads, head_dim, -1)[:, interleave_perm(head_dim)].reshape(w.shape)


def check_exportable(cfg: ModelConfig) -> None:
    """HF Chameleon always applies QK-Norm and derives head_dim = hidden_size / heads."""
    if not cfg.qk_norm:
        raise ValueError("HF Chameleon always applies QK-Norm; a model with qk_norm=false cannot be exported")
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ValueError(
            f"HF Chameleon needs head_dim · n_heads == dim (got {cfg.head_dim}·{cfg.n_heads} != {cfg.dim})"
        )


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for `transformers.ChameleonConfig` describing the same text model."""
    check_exportable(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rope_theta=float(cfg.rope_theta),  # transformers < 5 reads this key instead
        rms_norm_eps=cfg.norm_eps,
        swin_norm=cfg.norm_placement == "swin",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        vocabulary_map={},  # no VQGAN image tokens: every id is an ordinary token
    )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our `Transformer.state_dict()` → `ChameleonForConditionalGeneration` text weights."""
    check_exportable(cfg)
    out = {
        "model.embed_tokens.weight": state_dict["tok_emb.weight"],
        "model.norm.weight": state_dict["norm.weight"],
        "lm_head.weight": state_dict["head.weight"],
    }
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state_dict[src + "attn.wqkv.weight"].split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=0)
        q, k = _heads_to_hf(q, cfg.n_heads, cfg.head_dim), _heads_to_hf(k, cfg.n_kv_heads, cfg.head_dim)
        nw = _heads_to_hf(state_dict[src + "attn.qk_norm.weight"], cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
        nb = _heads_to_hf(state_dict[src + "attn.qk_norm.bias"], cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
        gate, up = state_dict[src + "mlp.w13.weight"].split([cfg.mlp_hidden, cfg.mlp_hidden], dim=0)
        out.update(
            {
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": state_dict[src + "attn.wo.weight"],
                dst + "self_attn.q_norm.weight": nw[: cfg.n_heads],
                dst + "self_attn.q_norm.bias": nb[: cfg.n_heads],
                dst + "self_attn.k_norm.weight": nw[cfg.n_heads :],
                dst + "self_attn.k_norm.bias": nb[cfg.n_heads :],
                dst + "mlp.gate_proj.weight": gate,
                dst + "mlp.up_proj.weight": up,
                dst + "mlp.down_proj.weight": state_dict[src + "mlp.w2.weight"],
                dst + "input_layernorm.weight": state_dict[src + "attn_norm.weight"],
                dst + "post_attention_layernorm.weight": state_dict[src + "mlp_norm.weight"],
            }
        )
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict` (VQGAN weights, if present, are ignored)."""
    check_exportable(cfg)
    out = {
        "tok_emb.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "head.weight": hf["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        a = src + "self_attn."
        q = _heads_from_hf(hf[a + "q_proj.weight"], cfg.n_heads, cfg.head_dim)
        k = _heads_from_hf(hf[a + "k_proj.weight"], cfg.n_kv_heads, cfg.head_dim)
        out[dst + "attn.wqkv.weight"] = torch.cat([q, k, hf[a + "v_proj.weight"]])
        out[dst + "attn.wo.weight"] = hf[a + "o_proj.weight"]
        for n in ("weight", "bias"):
            both = torch.cat([hf[a + "q_norm." + n], hf[a + "k_norm." + n]])  # [H + Hkv, hd]
            out[dst + "attn.qk_norm." + n] = _heads_from_hf(both, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
        out[dst + "mlp.w13.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
        out[dst + "mlp.w2.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
    return out


# The smallest VQ HF's Chameleon builds: the comparisons use its text path only, and an exported
# folder carries it (zero weights) as a placeholder for our own image tokenizer.
MINIMAL_VQ = dict(embed_dim=4, num_embeddings=8, latent_channels=4, resolution=8, base_channels=32,
                channel_multiplier=[1], num_res_blocks=1, attn_resolutions=[])


def hf_chameleon(cfg: ModelConfig, attn: str = "sdpa"):
    """An HF `ChameleonForConditionalGeneration` (random weights) with our model's dimensions.

    attn: HF's attention implementation ("eager" = plain softmax(qkᵀ)v, "sdpa"). Load our weights
    with `model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)`.
    """
    import transformers  # optional: the anymodal[hf] extra

    hf_cfg = transformers.ChameleonConfig(**hf_config_kwargs(cfg), vq_config=MINIMAL_VQ)
    hf_cfg._attn_implementation = attn
    return transformers.ChameleonForConditionalGeneration(hf_cfg)

"""Mapping to Hugging Face `transformers` Chameleon (text path): config keys and weight names.

Pure torch (does not import transformers). Our fused projections are split back into HF's:
`wqkv` → q_proj | k_proj | v_proj, `w13` → gate_proj | up_proj. Used by the parity test and by
a later `export --format hf`.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def check_exportable(cfg: ModelConfig) -> None:
    """HF Chameleon always applies QK-Norm and derives head_dim = hidden_size / heads."""
    if not cfg.qk_norm:
        raise ValueError("HF Chameleon always applies QK-Norm; a model with qk_norm=false cannot be exported")
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ValueError(f"HF Chameleon needs head_dim · n_heads == dim (got {cfg.head_dim}·{cfg.n_heads} != {cfg.dim})")


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
        gate, up = state_dict[src + "mlp.w13.weight"].split([cfg.mlp_hidden, cfg.mlp_hidden], dim=0)
        out.update(
            {
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": state_dict[src + "attn.wo.weight"],
                dst + "self_attn.q_norm.weight": state_dict[src + "attn.q_norm.weight"],
                dst + "self_attn.q_norm.bias": state_dict[src + "attn.q_norm.bias"],
                dst + "self_attn.k_norm.weight": state_dict[src + "attn.k_norm.weight"],
                dst + "self_attn.k_norm.bias": state_dict[src + "attn.k_norm.bias"],
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
        out[dst + "attn.wqkv.weight"] = torch.cat([hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]])
        out[dst + "attn.wo.weight"] = hf[a + "o_proj.weight"]
        for n in ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"):
            out[dst + "attn." + n] = hf[a + n]
        out[dst + "mlp.w13.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.w2.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
    return out

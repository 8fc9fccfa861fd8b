"""ModelConfig: the shape of the decoder-only transformer (one dataclass, loaded from YAML).

Fields left at `None` are derived in `__post_init__` (head_dim = dim / n_heads, n_kv_heads = n_heads,
SwiGLU hidden = 8/3 · dim rounded up to `multiple_of`), so a saved config always holds the concrete
numbers and reloading it builds exactly the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import check_choice
from ..errors import ConfigError

NORM_PLACEMENTS = ("pre", "swin")
ATTENTION_IMPLS = ("auto", "sdpa")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain multi-head)
    head_dim: int | None = None  # None = dim // n_heads (the only choice HF Chameleon can export)
    mlp_hidden: int | None = None  # SwiGLU hidden size; None = 8/3 · dim rounded up to multiple_of
    multiple_of: int = 64
    max_seq_len: int = 2048  # longest sequence the model is trained / sampled with (cache size cap)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5  # RMSNorm eps (QK-Norm's LayerNorm uses 1e-5 as Chameleon does)
    norm_placement: str = "pre"  # 'pre' (Llama, Chameleon-7B) | 'swin' (Chameleon-34B reordering)
    qk_norm: bool = True
    dropout: float = 0.0  # on the residual branches, training only
    init_std: float = 0.02
    # one matrix for the token embedding and the output head (GPT-2's weight tying)
    tie_embeddings: bool = False
    z_loss_weight: float = 1e-5
    activation_checkpointing: bool = False  # recompute each block in backward (training only)
    # 'auto': a registered fast path may take the attention (on CPU, anymodal.kernels' matmul
    # attention, faster than SDPA's CPU flash kernel); 'sdpa': always F.scaled_dot_product_attention.
    attention: str = "auto"
    # Factored embeddings for a block of code ids (an image tokenizer's product codes): the row of
    # code id `code_offset + c` (tied: its output row too) is the sum of one row per factor, chosen by
    # c's digits in the mixed radix `code_factors` (least significant first). A code never seen in
    # training whose factors were seen (a colour and a shape part met apart) still has a trained
    # row. Empty = plain table rows.
    code_factors: list[int] = field(default_factory=list)
    code_offset: int = 0
    # Decode steps (the tokens a model generates, fed back) embed a code without its first factor's
    # row: with (colour, structure) image codes the model reads what it drew as structure alone, as
    # training with `image_colour_dropout` taught it, and continues a shape from the shape drawn so
    # far, not from the shapes its colour came with. Prompts (prefill) are read whole. Needs
    # code_factors (bundles of such a model keep them unfolded).
    blind_decode: bool = False

    def __post_init__(self) -> None:
        check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        check_choice("attention", self.attention, ATTENTION_IMPLS)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name}' must be positive, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config key 'n_kv_heads' ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"config key 'head_dim' must be positive and even (RoPE), got {self.head_dim}")
        if self.mlp_hidden is None:
            hidden = int(8 * self.dim / 3)
            self.mlp_hidden = self.multiple_of * -(-hidden // self.multiple_of)
        if self.mlp_hidden <= 0:
            raise ConfigError(f"config key 'mlp_hidden' must be positive, got {self.mlp_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'dropout' must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0 or self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("config keys 'init_std', 'rope_theta' and 'norm_eps' must be positive")
        if self.z_loss_weight < 0:
            raise ConfigError(f"config key 'z_loss_weight' must be >= 0, got {self.z_loss_weight}")
        if self.code_factors:
            count = math.prod(self.code_factors)
            if min(self.code_factors) < 1 or self.code_offset < 0 or self.code_offset + count > self.vocab_size:
                raise ConfigError(f"code_factors {self.code_factors} need their {count} code ids inside the "
                                  f"vocabulary: code_offset {self.code_offset} + {count} > vocab_size {self.vocab_size}")
        if self.blind_decode and len(self.code_factors) < 2:
            raise ConfigError("blind_decode needs code_factors (a first factor to leave out and another to keep)")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim  # type: ignore[operator]

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim  # type: ignore[operator]

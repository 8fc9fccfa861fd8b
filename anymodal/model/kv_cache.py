"""KV cache for incremental decoding: keys/values of every layer in preallocated tensors.

Rows of a batch may hold prompts of different lengths (and a CFG unconditional branch); they are
left-padded so that every row ends at the same slot. `valid` marks which slots hold real tokens
(padding never receives attention) and `next_pos` holds each row's next RoPE position, so a
padded row sees exactly the positions it would see alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # [n_layers, B, n_kv_heads, max_len, head_dim]
    v: torch.Tensor  # [n_layers, B, n_kv_heads, max_len, head_dim]
    valid: torch.Tensor  # bool [B, max_len]: slot holds a real (non-padding) token
    next_pos: torch.Tensor  # long [B]: RoPE position of each row's next token
    length: int = 0  # slots filled so far (the same for all rows: padding is on the left)
    padded: bool = False  # some filled slot is padding, so decode needs an explicit mask

    @classmethod
    def empty(cls, cfg, batch: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        """A cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            valid=torch.zeros(batch, max_len, device=device, dtype=torch.bool),
            next_pos=torch.zeros(batch, device=device, dtype=torch.long),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values [B, Hkv, T, hd] of `layer`; return all keys/values so far.

        `length` is advanced once per model step by `advance`, after every layer has written.
        """
        t = k.shape[2]
        end = self.length + t
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # [B, Hkv, end, hd]

    def check_room(self, t: int) -> None:
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > max_len {self.max_len}")

    def advance(self, valid: torch.Tensor, last_pos: torch.Tensor) -> None:
        """Mark the T slots just written (valid [B, T]) and set next positions from last_pos [B]."""
        t = valid.shape[1]
        self.valid[:, self.length : self.length + t] = valid
        self.next_pos = last_pos + 1
        self.length += t

    def reset(self) -> None:
        self.length = 0
        self.padded = False
        self.valid.zero_()
        self.next_pos.zero_()

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache holding only `rows` (e.g. drop finished sequences from a batch)."""
        return KVCache(
            k=self.k[:, rows].contiguous(),
            v=self.v[:, rows].contiguous(),
            valid=self.valid[rows].contiguous(),
            next_pos=self.next_pos[rows].contiguous(),
            length=self.length,
            padded=self.padded,
        )

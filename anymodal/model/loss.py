"""Language-model loss: fp32 cross-entropy + z-loss, also split by modality.

`lm_loss` never makes an fp32 copy of the whole logits tensor: a custom autograd function computes
logsumexp and the target logit in row chunks, saves only the logits it was given, and in backward
rebuilds softmax chunk by chunk straight into the gradient. (`F.cross_entropy` keeps a full fp32
log-softmax [N, V] alive until backward, plus an fp32 upcast when the logits are bf16.)

z-loss (PaLM, Chameleon): w · mean(logsumexp(logits)²) over label positions; it keeps the softmax
normalizer near 1 so bf16 logits do not drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODALITY_NAMES = ("text", "image", "audio", "loc")  # ids 0..3, as anymodal.tokenizers.token_space.Modality
CHUNK_ELEMENTS = 1 << 18  # rows per chunk ≈ this / V: a chunk's fp32 softmax stays in L2/L3 cache


@dataclass
class LossOutput:
    ce: torch.Tensor  # scalar fp32: mean cross-entropy over label positions
    z_loss: torch.Tensor  # scalar fp32: already multiplied by its weight
    per_modality_sum: dict[str, torch.Tensor]  # name -> summed CE over that modality's label positions
    per_modality_count: dict[str, torch.Tensor]  # name -> number of label positions (long)

    @property
    def loss(self) -> torch.Tensor:
        """What to backpropagate: ce + z_loss."""
        return self.ce + self.z_loss

    def per_modality_mean(self) -> dict[str, float]:
        """Mean CE per modality that has labels (for logging)."""
        return {
            k: float(self.per_modality_sum[k]) / int(c) for k, c in self.per_modality_count.items() if int(c) > 0
        }


class _LogSumExpAndTarget(torch.autograd.Function):
    """(logsumexp(x_i), x_i[y_i]) per row of x [N, V], both fp32 [N], chunked and copy-free."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor):
        n, v = logits.shape
        chunk = max(1, CHUNK_ELEMENTS // v)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            lse[s : s + chunk] = torch.logsumexp(logits[s : s + chunk].float(), dim=-1)
        tgt = logits.gather(1, target[:, None]).squeeze(1).float()  # [N]
        ctx.save_for_backward(logits, target, lse)
        return lse, tgt

    @staticmethod
    def backward(ctx, g_lse, g_tgt):
        logits, target, lse = ctx.saved_tensors
        n, v = logits.shape
        chunk = max(1, CHUNK_ELEMENTS // v)
        grad = torch.empty_like(logits)
        if g_lse is None:
            g_lse = torch.zeros_like(lse)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            # d lse / d x = softmax(x) = exp(x - lse)
            p = torch.sub(logits[s:e].float(), lse[s:e, None]).exp_().mul_(g_lse[s:e, None])  # [c, V]
            if g_tgt is not None:
                p.scatter_add_(1, target[s:e, None], g_tgt[s:e, None])
            grad[s:e] = p
        return grad, None


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    modality: torch.Tensor | None = None,
    z_loss_weight: float = 1e-5,
    ignore_index: int = -100,
) -> LossOutput:
    """Loss of logits [B, T, V] against labels [B, T] (already shifted: labels[t] is the token after t).

    modality [B, T]: modality id (0 text, 1 image, 2 audio, 3 loc) of each label; None = all text.
    Positions whose label is `ignore_index` count nowhere. Sum over modalities of
    per_modality_sum / total count equals `ce`.
    """
    v = logits.shape[-1]
    x = logits.reshape(-1, v)  # [N, V] (a view for contiguous logits)
    y = labels.reshape(-1)
    keep = y != ignore_index  # [N]
    lse, tgt = _LogSumExpAndTarget.apply(x, torch.where(keep, y, torch.zeros_like(y)))
    keep_f = keep.float()
    count = keep.sum()
    denom = count.clamp(min=1).float()
    ce_rows = (lse - tgt) * keep_f  # [N]
    ce = ce_rows.sum() / denom
    z_loss = z_loss_weight * (lse.square() * keep_f).sum() / denom

    if modality is None:
        mod = torch.zeros_like(y)
    else:
        mod = modality.reshape(-1).long()
    n_mod = len(MODALITY_NAMES)
    sums = torch.zeros(n_mod, dtype=torch.float32, device=x.device).index_add(0, mod, ce_rows)
    counts = torch.zeros(n_mod, dtype=torch.long, device=x.device).index_add(0, mod, keep.long())
    return LossOutput(
        ce=ce,
        z_loss=z_loss,
        per_modality_sum={name: sums[i] for i, name in enumerate(MODALITY_NAMES)},
        per_modality_count={name: counts[i] for i, name in enumerate(MODALITY_NAMES)},
    )

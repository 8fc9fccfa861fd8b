"""Language-model loss: fp32 cross-entropy + z-loss, also split by modality.

`lm_loss` never makes an fp32 copy of the whole logits tensor: a custom autograd function runs the
fused log-softmax kernel on row chunks, saves only the logits it was given, and in backward
rebuilds softmax chunk by chunk straight into the gradient. (`F.cross_entropy` keeps a full fp32
log-softmax [N, V] alive until backward, plus an fp32 upcast when the logits are bf16.)

z-loss (PaLM, Chameleon): w · mean(logsumexp(logits)²) over label positions; it keeps the softmax
normalizer near 1 so bf16 logits do not drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modality import MODALITY_NAMES
from . import fast_paths

CHUNK_ELEMENTS = 1 << 20  # rows per chunk = this / V (×16 on GPUs): a chunk's fp32 softmax is 4 MB (in cache)


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
            k: float(self.per_modality_sum[k]) / int(c)
            for k, c in self.per_modality_count.items()
            if int(c) > 0
        }


def _chunk_rows(x: torch.Tensor) -> int:
    budget = CHUNK_ELEMENTS if x.device.type == "cpu" else 16 * CHUNK_ELEMENTS  # GPUs: fewer launches
    return max(1, budget // x.shape[1])


class _CrossEntropyAndLSE(torch.autograd.Function):
    """Per row of x [N, V]: (ce = −log softmax(x)[y], lse = logsumexp(x)), both fp32 [N].

    Forward runs the fused log_softmax kernel on row chunks (its output never outlives the chunk);
    backward recomputes softmax per chunk and writes (g_ce + g_lse)·p − g_ce·onehot(y) into the
    gradient directly. Only x itself is saved.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, inplace: bool = False):
        ctx.inplace = inplace
        n = logits.shape[0]
        chunk = _chunk_rows(logits)
        ce = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            logp = torch.log_softmax(logits[s : s + chunk].float(), dim=-1)  # [c, V]
            ce[s : s + chunk] = logp.gather(1, target[s : s + chunk, None]).squeeze(1).neg_()
        lse = logits.gather(1, target[:, None]).squeeze(1).float() + ce  # x_y − log p_y
        ctx.save_for_backward(logits, target)
        return ce, lse

    @staticmethod
    def backward(ctx, g_ce, g_lse):
        logits, target = ctx.saved_tensors
        n = logits.shape[0]
        chunk = _chunk_rows(logits)
        g_ce = torch.zeros(n, device=logits.device) if g_ce is None else g_ce.float()
        scale = g_ce if g_lse is None else g_ce + g_lse.float()  # d/dx of both terms carries softmax(x)
        # inplace: the gradient overwrites the logits' own storage (no second [N, V] buffer)
        grad = logits if ctx.inplace else torch.empty_like(logits)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            p = torch.softmax(logits[s:e].float(), dim=-1)  # [c, V]
            if grad.dtype == torch.float32:  # write straight into the gradient
                torch.mul(p, scale[s:e, None], out=grad[s:e])
                grad[s:e].scatter_add_(1, target[s:e, None], -g_ce[s:e, None])
            else:  # finish in fp32, round once
                p.mul_(scale[s:e, None]).scatter_add_(1, target[s:e, None], -g_ce[s:e, None])
                grad[s:e] = p
        return grad, None, None


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    modality: torch.Tensor | None = None,
    z_loss_weight: float = 1e-5,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> LossOutput:
    """Loss of logits [B, T, V] against labels [B, T] (already shifted: labels[t] is the token after t).

    modality [B, T]: modality id (0 text, 1 image, 2 audio, 3 loc) of each label; None = all text.
    Positions whose label is `ignore_index` count nowhere. Sum over modalities of
    per_modality_sum / total count equals `ce`.
    inplace_backward: backward writes d loss/d logits into the logits tensor itself, saving a whole
    [B, T, V] buffer. Only for when this loss is the last use of `logits` (read metrics before
    backward); another autograd use of the same logits then fails loudly, it is never silently wrong.
    """
    v = logits.shape[-1]
    x = logits.reshape(-1, v)  # [N, V] (a view for contiguous logits)
    y = labels.reshape(-1)
    keep = y != ignore_index  # [N]
    target = torch.where(keep, y, torch.zeros_like(y))
    fast = fast_paths.call("cross_entropy", x, target, inplace_backward)
    ce_all, lse = fast if fast is not None else _CrossEntropyAndLSE.apply(x, target, inplace_backward)  # [N] each
    keep_f = keep.float()
    count = keep.sum()
    denom = count.clamp(min=1).float()
    ce_rows = ce_all * keep_f  # [N]
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

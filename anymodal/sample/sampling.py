"""Turning logits into tokens: temperature, top-k, top-p, per row, reproducibly.

Each batch row carries its own temperature / top-k / top-p (picked per step from the parameter set
of the modality it is generating) and its own `torch.Generator`, so a request's samples depend
only on its seed, not on what else shares the batch. Sampling is the Gumbel-max trick (argmax of
logits/T + Gumbel noise); a top-k-only row draws among its k best ids alone, which at batch 1 is
most of the sampling time saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..modality import MODALITY_NAMES

MODALITIES = MODALITY_NAMES  # one parameter set per modality of the generated token


@dataclass
class SamplingParams:
    """How one modality is sampled. temperature 0 = greedy; top_k 0 / top_p 1 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")


# Classifier-free guidance scale per generated modality (1 = off): strong guidance pushes a small
# model's images off (they drew right about half as often at 3 as at 1.5) while its speech reads
# better at 3 (docs/results.md, "Sampling settings").
DEFAULT_CFG = {"image": 1.5, "audio": 3.0}


@dataclass
class ModalitySampling:
    """One SamplingParams per modality of the token being generated (text, image, audio, loc)."""

    text: SamplingParams
    image: SamplingParams
    audio: SamplingParams
    loc: SamplingParams

    @classmethod
    def uniform(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> ModalitySampling:
        return cls(*(SamplingParams(temperature, top_k, top_p) for _ in MODALITIES))

    @classmethod
    def default(cls) -> ModalitySampling:
        """Defaults that work for the demo world: nucleus text, top-k images (at temperature 0.5) and
        audio, greedy boxes."""
        return cls(SamplingParams(0.8, 0, 0.95), SamplingParams(0.5, 100, 1.0),
                   SamplingParams(1.0, 100, 1.0), SamplingParams(0.0, 0, 1.0))

    def table(self) -> tuple[list[float], list[int], list[float]]:
        """(temperatures, top-ks, top-ps), each indexed by `Modality` id."""
        ps = [getattr(self, m) for m in MODALITIES]
        return [p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps]


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top-k ids and its smallest nucleus of mass >= top_p; the rest go to -inf.

    logits [B, V] (already divided by temperature), top_k [B] long (0 = off), top_p [B] (1 = off).
    """
    V = logits.shape[-1]
    if bool((top_p >= 1.0).all()):
        # top-k alone: the k-th largest value of each row is its threshold, no full sort needed
        # (ties at the threshold are all kept, as the sort path would keep them in some order).
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # [B]
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [B, 1]
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(V, device=logits.device)[None]  # [1, V]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # [B]
    drop = rank >= k[:, None]  # [B, V]
    probs = sorted_logits.softmax(-1)
    # Mass strictly before each id; an id is dropped once that mass already reaches top_p, which
    # always keeps the first id.
    before = probs.cumsum(-1) - probs
    drop |= before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | Sequence[float],
    top_k: torch.Tensor | Sequence[int],
    top_p: torch.Tensor | Sequence[float],
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one id per row. Returns (ids LongTensor [B], prob of each id under softmax(logits) [B]).

    `logits` [B, V] are fp32 with disallowed ids already at -inf; the per-row parameters [B] come as
    tensors or plain lists (the engine passes lists: no tensor ops for them on the hot path). The
    reported probability is under the plain (T = 1, unfiltered) constrained distribution: a
    confidence, e.g. for boxes.
    """
    B, V = logits.shape
    temps = temperature.tolist() if isinstance(temperature, torch.Tensor) else list(temperature)
    ks = top_k.tolist() if isinstance(top_k, torch.Tensor) else list(top_k)
    ps = top_p.tolist() if isinstance(top_p, torch.Tensor) else list(top_p)
    dev = logits.device
    ids = logits.argmax(-1)  # [B]: greedy rows (T = 0) keep this
    # Each sampling row takes its own path, chosen by its own parameters only, so its random
    # draws never depend on what else shares the batch.
    sampled = [i for i, t in enumerate(temps) if t > 0]
    # Top-k alone (the image/audio default): draw among the row's k best ids, a few ops on [n, k]
    # instead of [n, V]. Exactly k candidates are kept (ties at the k-th value broken by `topk`).
    cand_rows = [i for i in sampled if ks[i] > 0 and ps[i] >= 1.0]
    full_rows = [i for i in sampled if not (ks[i] > 0 and ps[i] >= 1.0)]
    if cand_rows:
        vals, cand = _rows(logits, cand_rows).topk(min(max(ks[i] for i in cand_rows), V), dim=-1)  # [n, kmax]
        vals = vals / _column([temps[i] for i in cand_rows], logits)
        for j, i in enumerate(cand_rows):
            k = min(ks[i], V)
            vals[j, :k] += _gumbel(k, generators[i], dev)
            vals[j, k:] = float("-inf")
        ids = _put_rows(ids, cand_rows, cand.gather(1, vals.argmax(-1, keepdim=True))[:, 0])
    if full_rows:
        scaled = _rows(logits, full_rows) / _column([temps[i] for i in full_rows], logits)  # [n, V]
        if any(ks[i] > 0 for i in full_rows) or any(ps[i] < 1.0 for i in full_rows):
            scaled = filter_logits(scaled, torch.tensor([ks[i] for i in full_rows], dtype=torch.long, device=dev),
                                   torch.tensor([ps[i] for i in full_rows], dtype=logits.dtype, device=dev))
        for j, i in enumerate(full_rows):
            scaled[j] += _gumbel(V, generators[i], dev)
        ids = _put_rows(ids, full_rows, scaled.argmax(-1))
    prob = logits.log_softmax(-1).gather(1, ids[:, None])[:, 0].exp()  # [B]
    return ids, prob


def _gumbel(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """n draws of Gumbel(0, 1) noise from one row's own generator."""
    u = torch.rand(n, generator=generator, device=device)
    return -torch.log(-torch.log(u.clamp_min(1e-20)))


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == len(x) else x[rows]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]  # [n, 1]


def _put_rows(ids: torch.Tensor, rows: list[int], picks: torch.Tensor) -> torch.Tensor:
    """ids with ids[rows] = picks (all of ids when rows covers every row)."""
    return picks if len(rows) == len(ids) else ids.index_copy(0, torch.tensor(rows, device=ids.device), picks)


def make_generators(seeds: list[int], device="cpu") -> list[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens

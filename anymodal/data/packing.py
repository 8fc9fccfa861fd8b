"""The packing loader: token shards -> fixed-length training rows with document masking.

Each epoch draws its document occurrences from a numpy Generator seeded by (seed, epoch)
(`epoch_occurrences`): every document of a folder once, or, in a weighted mixture of folders
(`anymodal.data.mixture.Mixture`), as often as its rate says; the occurrences are shuffled and each
may lose its conditioning prompt (classifier-free-guidance dropout). Rows are filled first-fit over a small look-ahead window of upcoming documents, so rows fill up
without splitting documents. A document longer than a row is cut into row-sized pieces, each
treated as its own document. The rest of a row is `<pad>`.

A row becomes (ids = row[:-1], labels = row[1:]), with
- doc_ids   [T]: index of the piece each token belongs to (pad: one more id) -> attention mask,
- positions [T]: restart at 0 at every piece start,
- labels   = -100 where the next token is in another piece or is padding,
- modality  [T]: modality id of each *label* token (per-modality losses),
- answer    [T]: the token lies after its document's conditioning span (the image of a t2i/a2i
  document, the speech of a tts one): what the model generates when it is asked.

The epoch's rows are computed from document lengths alone, so packing never reads tokens.
Rows are cut to a multiple of the global batch (`world_size · micro_batch · grad_accum`) and dealt
out so that optimizer step s always sees rows [s·G, (s+1)·G) however many processes share them:
micro-batch a of rank r at step s holds rows s·G + (a·W + r)·B … + B. The state is
(epoch, rows consumed in the epoch), so a resumed run — even with another process count — sees
exactly the rows it would have seen.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import UserError
from ..tokenizers.token_space import TokenSpace
from .prepare import FORMAT, INDEX_DTYPE, VERSION

if TYPE_CHECKING:  # mixture.py builds on this module
    from .mixture import Mixture

IGNORE_INDEX = -100
MAX_OPEN = 64  # shards kept memory-mapped at once (each map holds a file descriptor)


class TokenDataset:
    """Read-only view of a token-shard folder written by `anymodal prepare` (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            what = "an unfinished prepare (no manifest.json)" if (self.path / "shards").is_dir() else \
                "not a token-shard folder"
            raise UserError(f"{self.path} is {what}; run `anymodal prepare` first")
        m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT or int(m.get("version", 0)) > VERSION:
            raise UserError(f"{mpath} is not an {FORMAT} v{VERSION} manifest")

        self.manifest = m
        self.space = TokenSpace.load(self.path)
        self.dtype = np.dtype(m["dtype"])
        self.kind_names: list[str] = list(m.get("kinds", []))
        self._bases, self._sizes, parts = [], [], []
        for si, name in enumerate(m["shards"]):
            base = self.path / "shards" / name
            idx = np.load(f"{base}.idx.npy", allow_pickle=False)
            if idx.dtype != INDEX_DTYPE:
                raise UserError(f"{base}.idx.npy has an unexpected layout")
            meta = json.loads(Path(f"{base}.json").read_text())
            kinds = [self._kind_id(k) for k in meta.get("kinds", [])]
            self._bases.append(base)
            self._sizes.append(int(idx["offset"][-1] + idx["length"][-1]) if len(idx) else 0)
            kind_map = np.asarray(kinds or [0], dtype=np.int16)
            parts.append((np.full(len(idx), si, np.int32), idx, kind_map[idx["kind"]] if len(idx) else
                          np.zeros(0, np.int16)))
        self._maps: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.shard = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        idx = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, INDEX_DTYPE)
        self.offset = idx["offset"].astype(np.int64)
        self.lengths = idx["length"].astype(np.int64)
        self.cond_start = idx["cond_start"].astype(np.int64)
        self.cond_end = idx["cond_end"].astype(np.int64)
        self.kinds = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int16)
        if len(self) == 0:
            raise UserError(f"{self.path} holds no documents")

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps of shard s's ids and modalities; the most recent MAX_OPEN stay open."""
        if s in self._maps:
            self._maps.move_to_end(s)
            return self._maps[s]
        n = self._sizes[s]
        maps = (np.memmap(f"{self._bases[s]}.ids", dtype=self.dtype, mode="r", shape=(n,)),
                np.memmap(f"{self._bases[s]}.mod", dtype=np.uint8, mode="r", shape=(n,)))
        self._maps[s] = maps
        if len(self._maps) > MAX_OPEN:
            self._maps.popitem(last=False)
        return maps

    def _kind_id(self, kind: str) -> int:
        if kind not in self.kind_names:
            self.kind_names.append(kind)
        return self.kind_names.index(kind)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def kind(self, i: int) -> str:
        return self.kind_names[int(self.kinds[i])]

    @property
    def rates(self) -> np.ndarray:
        """Expected occurrences per document in an epoch: one folder holds each document once."""
        return np.ones(len(self))

    def epoch_rates(self, epoch: int) -> np.ndarray:
        """The rates of any epoch (a folder has no curriculum)."""
        return self.rates

    def doc(self, i: int, drop_cond: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [N], modality uint8 [N]) of document i, optionally without its conditioning span."""
        s, o, n = int(self.shard[i]), int(self.offset[i]), int(self.lengths[i])
        ids_map, mod_map = self._shard(s)
        ids = np.asarray(ids_map[o : o + n], dtype=np.int64)
        mod = np.array(mod_map[o : o + n])
        if drop_cond and self.cond_end[i] > self.cond_start[i] >= 0:
            cs, ce = int(self.cond_start[i]), int(self.cond_end[i])
            ids = np.concatenate([ids[:cs], ids[ce:]])
            mod = np.concatenate([mod[:cs], mod[ce:]])
        return ids, mod


@dataclass
class EpochPlan:
    """Rows of one epoch as pieces: row r holds pieces row_ptr[r] : row_ptr[r+1]."""

    row_ptr: np.ndarray  # int64 [rows + 1]
    doc: np.ndarray  # int64 [pieces]
    start: np.ndarray  # int64 [pieces]: first token of the piece in the (dropped) document
    length: np.ndarray  # int64 [pieces]
    drop: np.ndarray  # bool [pieces]: conditioning span removed

    @property
    def rows(self) -> int:
        return len(self.row_ptr) - 1


def epoch_occurrences(rates: np.ndarray, cond_len: np.ndarray, seed: int, epoch: int, cond_dropout: float = 0.0,
                      shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(documents [M] in packing order, conditioning dropped [M]) of one epoch.

    rates [N]: expected occurrences per document; document d occurs floor(r_d) + (u_d < frac(r_d))
    times. Whole rates (one folder: all 1) draw nothing for that, so the generator's calls are
    `permutation(M)` then `random(M)`, the order every plain run has always had.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(rates)
    whole = np.floor(rates)
    frac = rates - whole
    counts = whole.astype(np.int64)
    if frac.any():
        counts += rng.random(n) < frac
    docs = np.repeat(np.arange(n, dtype=np.int64), counts)
    m = len(docs)
    perm = rng.permutation(m) if shuffle else np.arange(m)
    u = rng.random(m)  # drawn even when unused so cond_dropout does not change the shuffle
    drop = (u < cond_dropout) & (cond_len[docs] > 0)
    return docs[perm], drop[perm]


def plan_epoch(lengths: np.ndarray, cond_len: np.ndarray, row_len: int, order: np.ndarray, drop: np.ndarray,
               lookahead: int = 64) -> EpochPlan:
    """Pack the occurrences `order` [M] of documents (lengths [N]) into rows of `row_len` tokens,
    occurrence j without its conditioning span where drop[j]; see the module docstring."""
    if len(drop) != len(order):
        raise ValueError("plan_epoch: `drop` must give one flag per occurrence in `order`")
    # per occurrence j (a document may occur more than once): its tokens once dropout is applied
    eff = lengths[order] - np.where(drop, cond_len[order], 0)

    def candidates():
        for j in range(len(order)):
            n_j = int(eff[j])
            for s in range(0, n_j, row_len):
                yield j, s, min(row_len, n_j - s)

    src = candidates()
    window: deque = deque()
    for c in src:
        window.append(c)
        if len(window) >= lookahead:
            break
    row_ptr = [0]
    pieces: list[tuple[int, int, int]] = []
    space = row_len
    while window:
        pick = -1
        for j, c in enumerate(window):  # first fit in arrival order
            if c[2] <= space:
                pick = j
                break
        if pick < 0:  # nothing fits the rest of this row: close it (padding)
            row_ptr.append(len(pieces))
            space = row_len
            continue
        c = window[pick]
        del window[pick]
        pieces.append(c)
        space -= c[2]
        nxt = next(src, None)
        if nxt is not None:
            window.append(nxt)
        if space == 0:
            row_ptr.append(len(pieces))
            space = row_len
    if len(pieces) > row_ptr[-1]:
        row_ptr.append(len(pieces))
    arr = np.asarray(pieces, dtype=np.int64).reshape(-1, 3)
    occ = arr[:, 0]
    return EpochPlan(np.asarray(row_ptr, np.int64), np.asarray(order, np.int64)[occ], arr[:, 1], arr[:, 2],
                     np.asarray(drop, bool)[occ])


class PackedLoader:
    """Endless iterator of packed micro-batches for one rank; `state_dict()` makes it resumable.

    Each item is a dict of CPU tensors: ids, labels, positions, doc_ids [B, T] int64 and
    modality [B, T] int64 (of the labels), plus `epoch` and `rows` (global row indices) for logs.
    `data` is one token-shard folder (a path or a TokenDataset) or a weighted `Mixture` of several.
    """

    def __init__(
        self,
        data: TokenDataset | Mixture | str | Path,
        seq_len: int,
        micro_batch: int = 1,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        seed: int = 0,
        cond_dropout: float = 0.0,
        shuffle: bool = True,
        lookahead: int = 64,
        loop: bool = True,
    ):
        self.data = TokenDataset(data) if isinstance(data, (str, Path)) else data
        if seq_len < 2 or micro_batch < 1 or grad_accum < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad loader settings: seq_len={seq_len} micro_batch={micro_batch} "
                            f"grad_accum={grad_accum} rank={rank}/{world_size}")
        if not 0.0 <= cond_dropout <= 1.0:
            raise UserError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        self.seq_len, self.micro_batch, self.grad_accum = seq_len, micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.seed, self.cond_dropout, self.shuffle, self.lookahead, self.loop = (
            seed, cond_dropout, shuffle, lookahead, loop)
        self.global_batch = world_size * micro_batch * grad_accum  # rows per optimizer step
        self.pad = int(self.data.space.pad)
        d = self.data
        self.cond_len = np.where(d.cond_end > d.cond_start, d.cond_end - d.cond_start, 0)
        self.epoch = 0
        self.consumed = 0  # rows of this epoch consumed by all ranks together (whole micro-batch rounds)
        self._plan: EpochPlan | None = None
        self._plan_epoch = -1

    # ---- plan ------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        if self._plan_epoch != epoch:
            order, drop = epoch_occurrences(self.data.epoch_rates(epoch), self.cond_len, self.seed, epoch,
                                            self.cond_dropout, self.shuffle)
            self._plan = plan_epoch(self.data.lengths, self.cond_len, self.seq_len + 1, order, drop, self.lookahead)
            self._plan_epoch = epoch
        return self._plan  # type: ignore[return-value]

    def rows_per_epoch(self, epoch: int | None = None) -> int:
        """Rows used in an epoch: the plan cut to a multiple of the global batch (or of one
        micro-batch round when not looping, so an eval pass loses as little as possible)."""
        rows = self.plan(self.epoch if epoch is None else epoch).rows
        unit = self.global_batch if self.loop else self.world_size * self.micro_batch
        return rows // unit * unit

    # ---- iteration -------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        round_size = self.world_size * self.micro_batch
        if self.consumed + round_size > self.rows_per_epoch():
            if not self.loop:
                raise StopIteration
            if self.consumed == 0:
                raise UserError(
                    f"{self.data.path} packs epoch {self.epoch} into {self.plan(self.epoch).rows} rows of "
                    f"{self.seq_len + 1} tokens, fewer than one optimizer step needs ({self.global_batch}); "
                    f"use more data, a smaller batch or a shorter seq_len")
            self.epoch += 1
            self.consumed = 0
        first = self.consumed + self.rank * self.micro_batch
        rows = list(range(first, first + self.micro_batch))
        batch = self.make_batch(self.epoch, rows)
        self.consumed += round_size
        return batch

    def make_batch(self, epoch: int, rows: list[int]) -> dict:
        plan = self.plan(epoch)
        width = self.seq_len + 1
        tok = np.full((len(rows), width), self.pad, dtype=np.int64)
        mod = np.zeros((len(rows), width), dtype=np.int64)
        doc = np.zeros((len(rows), width), dtype=np.int64)
        pos = np.zeros((len(rows), width), dtype=np.int64)
        ans = np.zeros((len(rows), width), dtype=bool)
        for b, r in enumerate(rows):
            at = 0
            lo, hi = int(plan.row_ptr[r]), int(plan.row_ptr[r + 1])
            for k, p in enumerate(range(lo, hi)):
                d, s, n = int(plan.doc[p]), int(plan.start[p]), int(plan.length[p])
                ids, m = self.data.doc(d, drop_cond=bool(plan.drop[p]))
                tok[b, at : at + n] = ids[s : s + n]
                mod[b, at : at + n] = m[s : s + n]
                doc[b, at : at + n] = k
                pos[b, at : at + n] = np.arange(n)
                if self.cond_len[d] > 0:  # where the answer starts in the (maybe dropped) document
                    first = int(self.data.cond_start[d] if plan.drop[p] else self.data.cond_end[d])
                    ans[b, at : at + n] = np.arange(s, s + n) >= first
                at += n
            doc[b, at:] = hi - lo  # padding: one block of its own, never a label
            pos[b, at:] = np.arange(width - at)
        n_pieces = (plan.row_ptr[np.asarray(rows) + 1] - plan.row_ptr[np.asarray(rows)])[:, None]  # [B, 1]
        # a label counts when it continues the same piece and is not padding
        keep = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] != n_pieces)  # [B, T]
        labels = np.where(keep, tok[:, 1:], IGNORE_INDEX)
        return {
            "ids": torch.from_numpy(tok[:, :-1].copy()),  # [B, T]
            "labels": torch.from_numpy(labels),  # [B, T]
            "positions": torch.from_numpy(pos[:, :-1].copy()),  # [B, T]
            "doc_ids": torch.from_numpy(doc[:, :-1].copy()),  # [B, T]
            "modality": torch.from_numpy(mod[:, 1:].copy()),  # [B, T] modality of each label
            "answer": torch.from_numpy(ans[:, :-1].copy()),  # [B, T] input token in an answer span
            "epoch": epoch,
            "rows": rows,
        }

    # ---- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # a mixture adds its sources (name, weight share, size) and kind weights: any change to
        # them changes every epoch's rows, so a resume must notice
        mix = self.data.signature() if hasattr(self.data, "signature") else {}
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "cond_dropout": self.cond_dropout, "global_batch": self.global_batch,
                "docs": len(self.data), "tokens": self.data.num_tokens, **mix}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        if "sources" in state and "sources" in now and state["sources"] != now["sources"]:
            raise UserError(f"cannot resume the data loader: the data sources changed (were "
                            f"{_sources_text(state['sources'])}; now {_sources_text(now['sources'])})")
        mixture_keys = (("kind_weights", "kind_weights", {}), ("phases", "the curriculum phases", [])) \
            if "sources" in now else ()
        for key, what, none in mixture_keys:
            if state.get(key, none) != now.get(key, none):
                raise UserError(f"cannot resume the data loader: {what} were {state.get(key, none)}, "
                                f"now {now.get(key, none)}")
        for key in ("seed", "seq_len", "cond_dropout", "docs", "tokens"):
            mine = now[key]
            if key in state and state[key] != mine:
                raise UserError(f"cannot resume the data loader: {key} was {state[key]}, now {mine} "
                                f"(the data or its settings changed)")
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise UserError(f"cannot resume the data loader: rows per optimizer step were "
                            f"{state['global_batch']}, now {self.global_batch} (world_size x micro_batch x "
                            f"grad_accum must stay the same)")
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])


def _sources_text(sources: list[dict]) -> str:
    return ", ".join(f"{s['name']} (share {s['share']:.4g}, {s['docs']} docs, {s['tokens']} tokens)" for s in sources)

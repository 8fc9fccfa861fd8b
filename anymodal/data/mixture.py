"""Weighted data mixtures: several token-shard folders presented to the packer as one document index.

A training run reads one folder written by `anymodal prepare`, or a weighted mixture of them
(OLMo-core's weighted sources are the model):

    data: [{path: tok/world, weight: 3, name: world}, {path: tok/captions, weight: 1}]
    kind_weights: {t2i: 2, prose: 0}

Semantics:
- An epoch holds as many tokens as all sources together: E = the sum of their token counts.
- A source's `weight` is its share of an epoch's tokens: source s supplies E · w_s / Σw.
- Within a source a document's sampling rate is proportional to the weight of its kind
  (`kind_weights`, the kinds prepare stored: t2i, i2t, ground, refer, asr, tts, a2i, story, prose,
  ...; default 1, 0 drops the kind). Document d of source s so has the expected repetition count
      r_d = k_d · (E · w_s / Σw) / Σ_{d' in s} k_d' · len_d'     (lengths before CFG dropout)
- In each epoch document d occurs floor(r_d) + (u_d < frac(r_d)) times, u drawn from the epoch's
  generator (seeded by (seed, epoch); `packing.epoch_occurrences`); the occurrences are shuffled,
  and each decides its classifier-free-guidance dropout on its own. Packing then proceeds as for
  one folder, so rows stay a pure function of (seed, epoch).
- One source without kind weights has r_d = 1 for every document: no rounding draw is made and the
  generator's calls are exactly the plain loader's (`permutation(n)`, then `random(n)`), so such a
  run sees the rows a single folder always gave.

A curriculum puts `phases` before the regular epochs: phase i is epoch i, of `tokens` planned
tokens, drawn with its own source weights (by name; a source it does not name gets 0) and kind
weights (default: the run's):

    phases: [{tokens: 2500000, weights: {many_objects: 1}, kind_weights: {ground: 3}}]

Its rates follow the formula above with E = the phase's tokens; epochs after the last phase are
the regular ones. Epoch numbers run on through the phases, so every epoch's rows stay a pure
function of (seed, epoch) and a resumed run lands in the same phase at the same row.

All sources must share one token space. `MixCounter` accumulates what training actually saw:
tokens per source and per kind, from the epoch plan's pieces of each step's global rows (so the
counts are the same for any number of processes), and label tokens per modality, which the
trainer measures; `write_mix_json` writes them with the planned shares to `RUN/data_mix.json`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, UserError
from ..fileio import write_atomic
from ..modality import MODALITY_NAMES
from .packing import EpochPlan, TokenDataset

SOURCE_KEYS = ("path", "weight", "name")
PHASE_KEYS = ("tokens", "weights", "kind_weights")


def default_name(path: str | Path) -> str:
    """A source's name when none is given: its folder's name (`.` names the working directory;
    a symlink keeps the name it was given, not its target's)."""
    return Path(os.path.abspath(path)).name or str(path)


@dataclass(frozen=True)
class DataSource:
    """One token-shard folder of a mixture; `weight` is its share of an epoch's tokens (relative)."""

    path: str
    weight: float = 1.0
    name: str = ""  # "" = the folder's name; keys the realized-mix counts and the checkpoint

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", default_name(self.path))


@dataclass(frozen=True)
class Phase:
    """One curriculum phase: an epoch of `tokens` planned tokens with its own source weights (by
    source name) and kind weights (None = the run's)."""

    tokens: int
    weights: dict[str, float]
    kind_weights: dict[str, float] | None = None

    def signature(self) -> dict:
        total = sum(self.weights.values())
        return {"tokens": self.tokens, "share": {n: w / total for n, w in sorted(self.weights.items()) if w},
                "kind_weights": None if self.kind_weights is None else dict(sorted(self.kind_weights.items()))}


# ---- config values ---------------------------------------------------------------------------------
def parse_sources(value: Any, key: str = "data") -> list[DataSource]:
    """The sources of a `data` config value: a folder, a list of folders and/or mappings
    `{path, weight, name}`, or a single such mapping. Empty -> []; anything malformed -> ConfigError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, (str, Path)):
        return [DataSource(str(value))]
    if isinstance(value, Mapping):
        entries = [value]
    elif isinstance(value, Sequence):
        entries = list(value)
    else:
        raise ConfigError(f"config key '{key}' must be a token-shard folder or a list of sources "
                          f"[{{path: DIR, weight: W, name: N}}, ...], got {value!r}")
    sources = [_parse_source(e, f"{key}[{i}]") for i, e in enumerate(entries)]
    if sources:
        _check_sources(sources, key)
    return sources


def _is_weight(w: Any) -> bool:
    return not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w) and w >= 0


def _parse_source(entry: Any, where: str) -> DataSource:
    if isinstance(entry, (str, Path)):
        if not str(entry).strip():
            raise ConfigError(f"config key '{where}' is an empty path")
        return DataSource(str(entry))
    if not isinstance(entry, Mapping):
        raise ConfigError(f"config key '{where}' must be a folder or a mapping {{path: DIR, weight: W, name: N}}, "
                          f"got {entry!r}")
    unknown = [k for k in entry if k not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"config key '{where}' has unknown key {unknown[0]!r}; valid keys: {', '.join(SOURCE_KEYS)}")
    path = entry.get("path")
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ConfigError(f"config key '{where}' needs 'path': a token-shard folder, got {path!r}")
    weight = entry.get("weight", 1.0)
    if not _is_weight(weight):
        raise ConfigError(f"config key '{where}.weight' must be a finite number >= 0, got {weight!r}")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"config key '{where}.name' must be a non-empty string, got {name!r}")
    return DataSource(str(path), float(weight), name or "")


def _check_sources(sources: Sequence[DataSource], key: str) -> None:
    """Weights >= 0 with a positive sum, and distinct names."""
    if any(s.weight < 0 for s in sources) or sum(s.weight for s in sources) <= 0:
        raise ConfigError(f"config key '{key}': source weights must be >= 0 with a positive sum")
    names = [s.name for s in sources]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"config key '{key}': two sources are named {dup!r}; give them distinct names "
                          f"({{path: DIR, name: N}})")


def check_kind_weights(value: Any, key: str = "kind_weights") -> dict[str, float]:
    """`kind_weights` as {kind: weight >= 0} (ConfigError otherwise); {} = every kind 1.0."""
    return _check_weights(value, key, "document kinds", "{t2i: 2, prose: 0}")


def _check_weights(value: Any, key: str, what: str, example: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key '{key}' must map {what} to weights, e.g. {example}, got {value!r}")
    out = {}
    for name, w in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config key '{key}' has a bad name {name!r}")
        if not _is_weight(w):
            raise ConfigError(f"config key '{key}.{name}' must be a finite number >= 0, got {w!r}")
        out[name] = float(w)
    return out


def parse_phases(value: Any, key: str = "phases") -> list[Phase]:
    """The curriculum of a `phases` config value: a list of mappings {tokens, weights, kind_weights};
    empty or None -> []; anything malformed -> ConfigError. Source and kind names are checked
    against the data by `Mixture`."""
    if value is None or (isinstance(value, (str, Sequence)) and not value):
        return []
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"config key '{key}' must be a list of phases [{{tokens: N, weights: {{SOURCE: W}}, "
                          f"kind_weights: {{KIND: W}}}}, ...], got {value!r}")
    phases = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config key '{where}' must be a mapping {{tokens: N, weights: {{SOURCE: W}}}}, "
                              f"got {entry!r}")
        unknown = [k for k in entry if k not in PHASE_KEYS]
        if unknown:
            raise ConfigError(f"config key '{where}' has unknown key {unknown[0]!r}; valid keys: "
                              f"{', '.join(PHASE_KEYS)}")
        tokens = entry.get("tokens")
        if isinstance(tokens, float) and tokens.is_integer():
            tokens = int(tokens)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ConfigError(f"config key '{where}.tokens' must be a whole number of tokens >= 1, got {tokens!r}")
        weights = _check_weights(entry.get("weights"), f"{where}.weights", "source names", "{world: 1}")
        if sum(weights.values()) <= 0:
            raise ConfigError(f"config key '{where}.weights' must give some source a weight > 0")
        kinds = entry.get("kind_weights")
        if kinds is not None:
            kinds = check_kind_weights(kinds, f"{where}.kind_weights")
        phases.append(Phase(tokens, weights, kinds))
    return phases


# ---- the mixture ---------------------------------------------------------------------------------------
class Mixture:
    """Several token-shard folders as one document index: global document i is document
    i - offsets[s] of source s = source[i]. Offers what `PackedLoader` reads of a TokenDataset
    (lengths, cond spans, kinds, `epoch_rates`, `doc`, `space`, `path`); `phases` is the curriculum
    that comes before the regular epochs (module docstring)."""

    def __init__(self, sources: Sequence[DataSource | str | Path], kind_weights: Mapping[str, float] | None = None,
                 phases: Sequence[Phase] = ()):
        self.sources = [s if isinstance(s, DataSource) else DataSource(str(s)) for s in sources]
        if not self.sources:
            raise UserError("no training data: set data=DIR (a folder written by `anymodal prepare`) or a list "
                            "of sources")
        _check_sources(self.sources, "data")
        self.kind_weights = check_kind_weights(kind_weights)
        self.datasets = [TokenDataset(s.path) for s in self.sources]
        self.space = self.datasets[0].space
        for s, d in zip(self.sources[1:], self.datasets[1:]):
            self.space.check_same(d.space, f"{self.sources[0].path} vs {s.path}")

        sizes = [len(d) for d in self.datasets]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [S + 1]
        self.source = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)  # [N] source of each document
        self.lengths = np.concatenate([d.lengths for d in self.datasets])
        self.cond_start = np.concatenate([d.cond_start for d in self.datasets])
        self.cond_end = np.concatenate([d.cond_end for d in self.datasets])
        self.cond_len = np.where(self.cond_end > self.cond_start, self.cond_end - self.cond_start, 0)
        # kind ids differ per folder (each lists its kinds in the order it met them): one shared list
        self.kind_names: list[str] = []
        kinds = []
        for d in self.datasets:
            names = d.kind_names or ["unknown"]
            remap = np.asarray([self._kind_id(k) for k in names], dtype=np.int16)
            kinds.append(remap[d.kinds])
        self.kinds = np.concatenate(kinds)  # [N] index into kind_names
        self.kind_factor = self._kind_factor(self.kind_weights, "kind_weights")
        self.rates = self._rates([s.weight for s in self.sources], self.kind_factor, float(self.lengths.sum()))
        self.phases = list(phases)
        names = [s.name for s in self.sources]
        self.phase_rates = []
        for i, ph in enumerate(self.phases):
            unknown = [n for n in ph.weights if n not in names]
            if unknown:
                raise UserError(f"phases[{i}].weights names source {unknown[0]!r}; the sources are {', '.join(names)}")
            factor = self.kind_factor if ph.kind_weights is None else self._kind_factor(
                ph.kind_weights, f"phases[{i}].kind_weights")
            self.phase_rates.append(self._rates([ph.weights.get(n, 0.0) for n in names], factor, float(ph.tokens)))
        self._planned: dict | None = None

    def _kind_id(self, kind: str) -> int:
        if kind not in self.kind_names:
            self.kind_names.append(kind)
        return self.kind_names.index(kind)

    def _kind_factor(self, kind_weights: Mapping[str, float], key: str) -> np.ndarray:
        """[K] sampling factor of each kind in kind_names (1 where not named)."""
        unknown = [k for k in kind_weights if k not in self.kind_names]
        if unknown:
            raise UserError(f"{key} names kind {unknown[0]!r}, which no source holds "
                            f"(kinds: {', '.join(self.kind_names)})")
        return np.asarray([kind_weights.get(k, 1.0) for k in self.kind_names], np.float64)

    def _rates(self, weights: Sequence[float], kind_factor: np.ndarray, epoch_tokens: float) -> np.ndarray:
        """Expected occurrences per document in an epoch of `epoch_tokens` tokens, source si
        weighted weights[si] (see the module docstring)."""
        k = kind_factor[self.kinds]
        total_weight = sum(weights)
        rates = np.zeros(len(self), np.float64)
        for si, (s, w) in enumerate(zip(self.sources, weights)):
            lo, hi = int(self.offsets[si]), int(self.offsets[si + 1])
            target = epoch_tokens * w / total_weight  # this source's tokens per epoch
            if target == 0:
                continue
            mass = float((k[lo:hi] * self.lengths[lo:hi]).sum())
            if mass == 0:
                held = sorted({self.kind_names[i] for i in np.unique(self.kinds[lo:hi])})
                raise UserError(f"source {s.name!r} ({s.path}) has weight {w:g} but kind_weights drop "
                                f"all of its documents (kinds {', '.join(held)})")
            rates[lo:hi] = k[lo:hi] * (target / mass)
        return rates

    def epoch_rates(self, epoch: int) -> np.ndarray:
        """[N] expected occurrences per document in `epoch`: a curriculum phase's, then the regular ones."""
        return self.phase_rates[epoch] if epoch < len(self.phase_rates) else self.rates

    # ---- what the loader reads ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def manifest(self) -> dict:
        """The first source's manifest (it names the tokenizer set; all sources share one token space)."""
        return self.datasets[0].manifest

    @property
    def path(self) -> str:
        """For messages: the folder, or the folders of a mixture."""
        return " + ".join(str(s.path) for s in self.sources)

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index in that source's folder) of global document i."""
        s = int(self.source[i])
        return s, int(i - self.offsets[s])

    def kind(self, i: int) -> str:
        return self.kind_names[int(self.kinds[i])]

    def doc(self, i: int, drop_cond: bool = False) -> tuple[np.ndarray, np.ndarray]:
        s, j = self.locate(i)
        return self.datasets[s].doc(j, drop_cond)

    def signature(self) -> dict:
        """What fixes every epoch's rows beyond the loader's own settings (kept in its state)."""
        total = sum(s.weight for s in self.sources)
        sig = {"sources": [{"name": s.name, "share": s.weight / total, "docs": len(d), "tokens": d.num_tokens}
                           for s, d in zip(self.sources, self.datasets)],
               "kind_weights": {k: w for k, w in sorted(self.kind_weights.items()) if w != 1.0}}
        if self.phases:  # absent without a curriculum, so earlier checkpoints still resume
            sig["phases"] = [ph.signature() for ph in self.phases]
        return sig

    # ---- planned shares ------------------------------------------------------------------------------
    def planned(self) -> dict:
        """Per source and per kind: documents, tokens held, planned tokens per epoch, share, and the
        repetition factor (planned tokens per epoch / tokens held)."""
        if self._planned is not None:
            return self._planned
        per_doc = self.rates * self.lengths
        epoch_tokens = float(per_doc.sum())
        total_weight = sum(s.weight for s in self.sources)
        sources = {}
        for si, (s, d) in enumerate(zip(self.sources, self.datasets)):
            lo, hi = int(self.offsets[si]), int(self.offsets[si + 1])
            planned = float(per_doc[lo:hi].sum())
            sources[s.name] = {"path": str(s.path), "weight": s.weight, "share": s.weight / total_weight,
                               "docs": len(d), "tokens": d.num_tokens, "tokens_per_epoch": round(planned, 1),
                               "repeat": planned / d.num_tokens}
        kinds = {}
        for ki, name in enumerate(self.kind_names):
            mask = self.kinds == ki
            tokens = int(self.lengths[mask].sum())
            planned = float(per_doc[mask].sum())
            kinds[name] = {"weight": float(self.kind_factor[ki]), "docs": int(mask.sum()), "tokens": tokens,
                           "tokens_per_epoch": round(planned, 1),
                           "share": planned / epoch_tokens if epoch_tokens else 0.0,
                           "repeat": planned / tokens if tokens else 0.0}
        self._planned = {"epoch_tokens": round(epoch_tokens, 1), "source": sources, "kind": kinds}
        if self.phases:
            self._planned["phases"] = [self._phase_plan(ph, r) for ph, r in zip(self.phases, self.phase_rates)]
        return self._planned

    def _phase_plan(self, phase: Phase, rates: np.ndarray) -> dict:
        """A phase's planned tokens and its shares per source and per kind."""
        per_doc = rates * self.lengths
        total = float(per_doc.sum())
        source = {s.name: float(per_doc[self.offsets[si]:self.offsets[si + 1]].sum()) / total
                  for si, s in enumerate(self.sources)}
        kind = {name: float(per_doc[self.kinds == ki].sum()) / total for ki, name in enumerate(self.kind_names)}
        return {"tokens": phase.tokens, "source_share": source, "kind_share": kind}


def format_plan(planned: dict) -> str:
    """The planned shares as a short text table (printed at the start of training)."""
    head = f"{'':<14}{'docs':>8}{'tokens':>13}{'weight':>8}{'share':>8}{'tok/epoch':>13}{'repeat':>8}"
    lines = [f"data mix, planned per epoch of {planned['epoch_tokens']:,.0f} tokens:"]
    for table in ("source", "kind"):
        lines.append("  " + table.ljust(14) + head[14:])
        for name, r in planned[table].items():
            lines.append(f"  {name[:13]:<14}{r['docs']:>8,}{r['tokens']:>13,}{r['weight']:>8.3g}{r['share']:>8.1%}"
                         f"{r['tokens_per_epoch']:>13,.0f}{r['repeat']:>7.2f}x")
    for i, ph in enumerate(planned.get("phases", [])):
        src, kinds = ([f"{n} {v:.0%}" for n, v in ph[key].items() if v >= 0.005]
                      for key in ("source_share", "kind_share"))
        lines.append(f"  curriculum phase {i + 1} (epoch {i}), {ph['tokens']:,} tokens: sources {', '.join(src)}; "
                     f"kinds {', '.join(kinds)}")
    return "\n".join(lines)


# ---- realized mix -----------------------------------------------------------------------------------
class MixCounter:
    """Cumulative tokens trained per source and per kind (document tokens placed in the trained
    rows, after CFG dropout, from the epoch plan) and label tokens per modality (from the trainer)."""

    def __init__(self, mixture: Mixture):
        self.mixture = mixture
        self.source = np.zeros(len(mixture.sources), np.int64)
        self.kind = np.zeros(len(mixture.kind_names), np.int64)
        self.modality = dict.fromkeys(MODALITY_NAMES, 0)

    def add_rows(self, plan: EpochPlan, lo: int, hi: int) -> None:
        """Count rows [lo, hi) of an epoch's plan: one optimizer step's global rows s·G … (s+1)·G,
        whichever process trained them."""
        a, b = int(plan.row_ptr[lo]), int(plan.row_ptr[hi])
        docs, n = plan.doc[a:b], plan.length[a:b]
        np.add.at(self.source, self.mixture.source[docs], n)
        np.add.at(self.kind, self.mixture.kinds[docs], n)

    def add_labels(self, counts: Mapping[str, float]) -> None:
        """Label tokens per modality of one step (all ranks together)."""
        for m, c in counts.items():
            self.modality[m] = self.modality.get(m, 0) + int(round(float(c)))

    @property
    def tokens(self) -> int:
        return int(self.source.sum())

    def record(self) -> dict:
        return {"source": {s.name: int(c) for s, c in zip(self.mixture.sources, self.source)},
                "kind": {k: int(c) for k, c in zip(self.mixture.kind_names, self.kind)},
                "modality": dict(self.modality)}

    def state_dict(self) -> dict:
        return self.record()

    def load_state_dict(self, state: Mapping | None) -> None:
        """Counts saved by `state_dict` (a checkpoint of the same mixture: the loader refuses others)."""
        if not state:
            return
        for i, s in enumerate(self.mixture.sources):
            self.source[i] = int(state.get("source", {}).get(s.name, 0))
        for i, k in enumerate(self.mixture.kind_names):
            self.kind[i] = int(state.get("kind", {}).get(k, 0))
        self.modality.update({m: int(c) for m, c in state.get("modality", {}).items()})


def _shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def write_mix_json(path: str | Path, mixture: Mixture, counter: MixCounter, step: int) -> None:
    """RUN/data_mix.json: planned shares and realized cumulative counts and shares (atomic write)."""
    rec = counter.record()
    out = {"step": step, "planned": mixture.planned(),
           "realized": {"tokens": counter.tokens, "label_tokens": sum(rec["modality"].values()), **rec,
                        "share": {k: _shares(v) for k, v in rec.items()}}}
    write_atomic(path, json.dumps(out, indent=1) + "\n")

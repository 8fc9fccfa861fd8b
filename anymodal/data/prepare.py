"""`anymodal prepare`: run the frozen tokenizers once over raw shards and write token shards.

Raw documents (webdataset shards, read by `anymodal.data.reader.iter_documents`) become id
sequences of the stream (`<s> text… <boi> codes <eoi> … </s>`). Images are fitted by the image
mode (the image tokenizer's `model.image_mode` unless `--image-mode` says otherwise): resize or
letterbox to its square resolution, or native, each image on the grid nearest its own aspect
within `max_image_tokens` codes (`media.native_grid`; default the tokenizer's `max_tokens`), its
boxes mapped through the same resize. Images are encoded in batches of one grid shape; audio
clips are batched by equal frame count (so every clip's codes are exactly what encoding it alone
gives; the quantizer runs once over all of a batch's frames). Shards are processed by a pool of
worker processes, one raw shard per task, and each finished shard is final: a rerun skips it
(resume per shard).

Token-shard format (a folder; all integers little-endian):

    token_space.json        the tokenizers' token space (checked again by every loader)
    manifest.json           {"format": "anymodal-tokens", "version": 1, "dtype": "uint16"|"uint32",
                             "shards": [names], "tokenizers": "/abs/dir", "kinds": [...], "docs", "tokens",
                             "image_mode", "max_image_tokens"} (the budget: null unless native)
                            written last: a folder without it is an unfinished prepare
    stats.json              docs, tokens per modality, docs per kind, bad records by reason, docs/s,
                            image_mode and max_image_tokens
    shards/NAME.ids         every document's ids back to back (dtype: uint16 when vocab <= 65536)
    shards/NAME.mod         uint8 modality id per token (0 text, 1 image, 2 audio, 3 loc)
    shards/NAME.idx.npy     one record per document (numpy structured array, no pickle):
                              offset int64      first token in .ids / .mod
                              length int32      tokens, <s> and </s> included
                              kind   int16      index into the shard's "kinds" list (NAME.json)
                              cond_start int32  conditioning span [cond_start, cond_end) of t2i/a2i/tts
                              cond_end   int32  documents (the prompt before the first <boi>/<boa>);
                                                -1/-1 when the document has none
    shards/NAME.json        per-shard stats plus "source" (the raw shard) and "kinds"; written
                            after the data files, so its presence marks the shard complete

The conditioning span is what classifier-free-guidance dropout removes at training time
(`anymodal.data.packing`): without it the image or audio span opens right after `<s>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..fileio import write_atomic
from ..modality import MODALITY_NAMES
from ..sample.prompt import image_mode as tokenizer_image_mode
from ..tokenizers import load_tokenizers
from ..tokenizers.stream import Audio, Box, Image, Text
from ..tokenizers.token_space import TokenSpace
from .media import IMAGE_MODES
from .reader import RecordCounter, expand_shards, iter_documents

FORMAT = "anymodal-tokens"
VERSION = 1
INDEX_DTYPE = np.dtype(
    [("offset", "<i8"), ("length", "<i4"), ("kind", "<i2"), ("cond_start", "<i4"), ("cond_end", "<i4")]
)
# Document kinds whose leading prompt is dropped for classifier-free guidance, and the special
# token (a TokenSpace attribute) that opens the generated span.
COND_TARGETS = {"t2i": "boi", "a2i": "boi", "tts": "boa"}


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def conditioning_span(kind: str, ids: np.ndarray, space) -> tuple[int, int]:
    """[start, end) of the prompt a CFG-dropout may remove: after <s>, up to the first span opener."""
    target = COND_TARGETS.get(kind)
    if target is None:
        return -1, -1
    start = 1 if len(ids) and ids[0] == space.bos else 0
    hits = np.flatnonzero(ids == getattr(space, target))
    if not len(hits) or hits[0] <= start:
        return -1, -1
    return start, int(hits[0])


# ---- writing one token shard ----------------------------------------------------------------------
class ShardWriter:
    """Append documents to `shards/NAME.{ids,mod,idx.npy}` (tmp names until `close`)."""

    def __init__(self, shard_dir: Path, name: str, dtype: np.dtype):
        self.dir, self.name, self.dtype = shard_dir, name, dtype
        self.tmp = {ext: shard_dir / f"{name}.{ext}.tmp" for ext in ("ids", "mod", "idx.npy")}
        self.f_ids = open(self.tmp["ids"], "wb")
        self.f_mod = open(self.tmp["mod"], "wb")
        self.index: list[tuple[int, int, int, int, int]] = []
        self.kinds: list[str] = []
        self.offset = 0

    def add(self, ids: np.ndarray, modality: np.ndarray, kind: str, cond: tuple[int, int]) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)
        self.f_ids.write(np.asarray(ids).astype(self.dtype).tobytes())
        self.f_mod.write(np.asarray(modality, dtype=np.uint8).tobytes())
        self.index.append((self.offset, len(ids), self.kinds.index(kind), cond[0], cond[1]))
        self.offset += len(ids)

    def close(self, stats: dict) -> None:
        for f in (self.f_ids, self.f_mod):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        with open(self.tmp["idx.npy"], "wb") as f:
            np.save(f, np.array(self.index, dtype=INDEX_DTYPE), allow_pickle=False)
        for ext, tmp in self.tmp.items():
            tmp.replace(self.dir / f"{self.name}.{ext}")
        _write_json(self.dir / f"{self.name}.json", {**stats, "kinds": self.kinds})

    def abort(self) -> None:
        for f in (self.f_ids, self.f_mod):
            f.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1))


# ---- raw document -> stream segments --------------------------------------------------------------
@dataclass
class _ShardStats:
    docs: int = 0
    tokens: int = 0
    tokens_by_modality: dict = field(default_factory=lambda: {m: 0 for m in MODALITY_NAMES})
    docs_by_kind: dict = field(default_factory=dict)
    bad: dict = field(default_factory=dict)
    max_doc_tokens: int = 0

    def count_bad(self, reason: str, n: int = 1) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + n


class _Encoder:
    """Holds the loaded tokenizers in one process and turns batches of raw documents into ids."""

    def __init__(self, tok_dir: str, device: str = "cpu", image_batch: int = 64, audio_batch: int = 32):
        self.tok = load_tokenizers(tok_dir, device=device)
        self.space = self.tok.space
        self.image_batch = image_batch
        self.audio_batch = audio_batch

    def encode_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [H, W, 3] images (native mode: several sizes) -> code grids, in order; one encoder
        call per grid shape and batch."""
        return self.tok.image.encode_pixels(images, self.image_batch)

    def encode_audio(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Clips -> the codes the stream carries, each exactly what encoding it alone gives."""
        audio = self.tok.audio
        return [c.numpy() for c in audio.encode_clips(waves, audio.stream_levels, self.audio_batch)]

    def encode_docs(self, docs: list, stats: _ShardStats, strict: bool):
        """Yield (ids, modality, kind, cond) per good document; count the bad ones."""

        images, waves = [], []
        usable = []
        for doc in docs:
            segs = doc.segments
            has_img = any("image" in s for s in segs)
            has_aud = any("audio" in s for s in segs)
            if (has_img and self.tok.image is None) or (has_aud and self.tok.audio is None):
                reason = "image without image tokenizer" if has_img and self.tok.image is None else \
                    "audio without audio tokenizer"
                if strict:
                    raise UserError(f"{doc.shard}:{doc.key}: {reason}")
                stats.count_bad(reason)
                continue
            usable.append(doc)
            images.extend(s["image"] for s in segs if "image" in s)
            waves.extend(s["audio"] for s in segs if "audio" in s)
        image_codes = self.encode_images(images) if images else []
        audio_codes = self.encode_audio(waves) if waves else []
        ii = ai = 0
        for doc in usable:
            segments = []
            for s in doc.segments:
                if "text" in s:
                    segments.append(Text(s["text"]))
                elif "image" in s:
                    segments.append(Image(image_codes[ii]))
                    ii += 1
                elif "audio" in s:
                    segments.append(Audio(audio_codes[ai]))
                    ai += 1
                elif "box" in s:
                    segments.append(Box(*(float(v) for v in s["box"])))
            try:
                ids, modality = self.tok.stream.encode(segments)
            except (UserError, ValueError, TypeError) as e:
                if strict:
                    raise UserError(f"{doc.shard}:{doc.key}: cannot encode: {e}") from None
                stats.count_bad(f"encode: {type(e).__name__}")
                continue
            kind = doc.kind or "unknown"
            yield ids, modality, kind, conditioning_span(kind, ids, self.space)


# ---- one shard in a worker ------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tok_dir: str, threads: int, progress, device: str = "cpu") -> None:
    torch.set_num_threads(threads)
    _WORKER["encoder"] = _Encoder(tok_dir, device)
    _WORKER["progress"] = progress


def _prepare_shard(task: dict) -> dict:
    """Tokenize one raw shard into `shards/NAME.*`; returns its stats (also saved as NAME.json)."""

    enc: _Encoder = _WORKER["encoder"]
    progress = _WORKER.get("progress")
    shard_dir = Path(task["out"]) / "shards"
    name = task["name"]
    t0 = time.time()
    stats = _ShardStats()
    counter = RecordCounter()
    writer = ShardWriter(shard_dir, name, np.dtype(task["dtype"]))
    if enc.tok.image is not None:
        image_args = enc.tok.image.cfg.model.reader_args(task["image_mode"], task["max_image_tokens"])
        if enc.space.any_aspect:
            image_args["image_max_side"] = enc.space.image_max_side
    else:
        image_args = {"image_size": 64, "image_mode": task["image_mode"]}
    sample_rate = enc.tok.audio.sample_rate if enc.tok.audio is not None else 16000

    def flush(buf: list) -> None:
        for ids, modality, kind, cond in enc.encode_docs(buf, stats, task["strict"]):
            writer.add(ids, modality, kind, cond)
            stats.docs += 1
            stats.tokens += len(ids)
            stats.max_doc_tokens = max(stats.max_doc_tokens, len(ids))
            counts = np.bincount(modality, minlength=len(MODALITY_NAMES))
            for m, c in zip(MODALITY_NAMES, counts):
                stats.tokens_by_modality[m] += int(c)
            stats.docs_by_kind[kind] = stats.docs_by_kind.get(kind, 0) + 1
        if progress is not None:
            with progress.get_lock():
                progress.value += len(buf)
        buf.clear()

    try:
        buf: list = []
        docs = iter_documents(task["source"], **image_args, sample_rate=sample_rate, strict=task["strict"],
                              counter=counter, cache_dir=task.get("cache_dir"))
        for doc in docs:
            buf.append(doc)
            if len(buf) >= task["batch_docs"]:
                flush(buf)
        flush(buf)
    except BaseException:
        writer.abort()
        raise
    for reason, n in _counter_counts(counter).items():
        stats.count_bad(reason, n)
    seconds = time.time() - t0
    out = {"name": name, "source": task["source"], "docs": stats.docs, "tokens": stats.tokens,
           "tokens_by_modality": stats.tokens_by_modality, "docs_by_kind": stats.docs_by_kind,
           "bad": stats.bad, "max_doc_tokens": stats.max_doc_tokens, "seconds": seconds}
    writer.close(out)
    return out


def _counter_counts(counter) -> dict[str, int]:
    """Bad records counted by the reader, by reason."""
    for attr in ("counts", "by_reason", "bad"):
        v = getattr(counter, attr, None)
        if isinstance(v, dict):
            return {str(k): int(n) for k, n in v.items() if int(n)}
    rep = counter.report() if hasattr(counter, "report") else {}
    if isinstance(rep, dict):
        inner = rep.get("bad", rep.get("by_reason", rep))
        return {str(k): int(n) for k, n in inner.items() if isinstance(n, (int, np.integer)) and n}
    return {}


def _shard_done(shard_dir: Path, name: str, source: str) -> dict | None:
    meta = shard_dir / f"{name}.json"
    if not meta.is_file() or not all((shard_dir / f"{name}.{e}").is_file() for e in ("ids", "mod", "idx.npy")):
        return None
    try:
        stats = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    return stats if stats.get("source") == source else None


# ---- the command ---------------------------------------------------------------------------------
def prepare(
    tokenizers: str | Path,
    input: str | Path | list,
    out: str | Path,
    workers: int | None = None,
    strict: bool = False,
    image_mode: str | None = None,
    max_image_tokens: int | None = None,
    batch_docs: int = 64,
    progress: bool = True,
    threads: int | None = None,
    device: str = "auto",
    part: int | None = None,
    parts: int = 1,
    cache_dir: str | Path | None = None,
) -> dict:
    """Tokenize the raw shards of `input` into the token-shard folder `out`; returns stats.json's dict.

    With `parts` > 1 this run tokenizes only part `part` (raw shards i with i % parts == part),
    so N machines can share the work (a Slurm array, a Kubernetes job, a shell loop), each into
    `out` on a shared file system or into a folder of its own. The run that finds every shard
    done writes `manifest.json` and `stats.json`; `merge` does the same after the fact, also
    gathering parts from their own folders. Every part must see the same input list and the same
    tokenizer set (`prepare.json` records both; a part that differs is refused). The returned dict
    holds "complete": whether the manifest was written.

    `image_mode`: resize | letterbox | native (default: the image tokenizer's `model.image_mode`);
    `max_image_tokens`: native mode's codes per image (default: the image tokenizer's `max_tokens`;
    given alone, it selects native).
    """


    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here")

    sources = expand_shards(input)
    if parts < 1 or (parts > 1 and (part is None or not 0 <= part < parts)) or (parts == 1 and part not in (None, 0)):
        raise UserError(f"--part must be in [0, {parts}) with --parts {parts}, got {part}")
    tok_dir = Path(tokenizers)
    toks = load_tokenizers(tok_dir)  # validates the set (and its token_space.json) up front
    space = toks.space
    images = _image_settings(toks, image_mode, max_image_tokens)
    out = Path(out)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    if (out / "token_space.json").is_file():
        TokenSpace.load(out).check_same(space, f"existing {out}/token_space.json vs the tokenizers")
    space.save(out / "token_space.json")
    _check_plan(out, sources, tok_dir, parts, images)
    (out / "manifest.json").unlink(missing_ok=True)  # re-marked complete at the end
    dtype = ids_dtype(space.vocab_size).str

    names = [f"{i:05d}" for i in range(len(sources))]
    done: dict[str, dict] = {}
    tasks = []
    for i, (name, src) in enumerate(zip(names, sources)):
        prev = _shard_done(shard_dir, name, src)
        if prev is not None:
            done[name] = prev
        elif i % parts == (part or 0):
            tasks.append({"name": name, "source": src, "out": str(out), "dtype": dtype, "strict": strict,
                          **images, "batch_docs": batch_docs,
                          "cache_dir": str(cache_dir) if cache_dir else None})
    cpus = os.cpu_count() or 1
    workers = max(1, min(workers or cpus, len(tasks) or 1))
    threads = threads or max(1, cpus // workers)  # torch threads per worker
    t0 = time.time()
    if tasks:
        _run_tasks(tasks, str(tok_dir), workers, threads, progress, len(done), len(sources), done, device)
    seconds = time.time() - t0
    if len(done) < len(names):  # other parts are still to come
        return {"complete": False, "shards": len(names), "shards_done": len(done),
                "docs": sum(d["docs"] for d in done.values()), "tokens": sum(d["tokens"] for d in done.values()),
                "seconds": round(seconds, 3)}
    return _finish(out, names, sources, done, tok_dir, dtype, seconds, [t["name"] for t in tasks], images)


def _image_settings(toks, image_mode: str | None, max_image_tokens: int | None) -> dict:
    """{"image_mode", "max_image_tokens"} of this prepare: the image tokenizer's own unless given; a
    budget alone means native (as `tokenizer encode image --max-tokens`). The budget is null unless
    native; a set without an image tokenizer skips documents with images."""
    if toks.image is None:
        if image_mode is not None and image_mode not in IMAGE_MODES:
            raise UserError(f"--image-mode must be one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
        return {"image_mode": image_mode or "resize", "max_image_tokens": None}
    if image_mode is None:  # fit images the way the image tokenizer (and sample/eval) does
        image_mode = "native" if max_image_tokens is not None else tokenizer_image_mode(toks.image)
    if image_mode not in IMAGE_MODES:
        raise UserError(f"--image-mode must be one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
    if max_image_tokens is not None and max_image_tokens < 1:
        raise UserError(f"--max-image-tokens must be at least 1, got {max_image_tokens}")
    if image_mode != "native":
        if max_image_tokens is not None:
            raise UserError(f"--max-image-tokens goes with --image-mode native, not {image_mode}")
        return {"image_mode": image_mode, "max_image_tokens": None}
    if not toks.space.any_aspect:
        raise UserError("--image-mode native needs a token space of version 2 (any image grid); this tokenizer "
                        "set's token_space.json holds square images only")
    return {"image_mode": image_mode, "max_image_tokens": max_image_tokens or toks.image.max_tokens}


PLAN = "prepare.json"


def tokenizer_fingerprint(tok_dir: str | Path) -> str:
    """A hash of a tokenizer set's files (weights, configs, token space): two sets with the same
    token space but other weights give other codes, and must not be mixed in one folder."""

    h = hashlib.sha256()
    root = Path(tok_dir)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and (
            p.suffix in (".model", ".safetensors", ".json") or p.name == "config.yaml")
            and "checkpoints" not in p.parts and p.name not in ("metrics.json",)):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _check_plan(out: Path, sources: list[str], tok_dir: Path, parts: int = 1, images: dict | None = None) -> dict:
    """Record (or check) what every part of this folder tokenizes, with which tokenizers and how
    images are fitted.

    A run of one part may change the input list (shards whose source changed are redone, as
    before parts existed); shards made by another tokenizer set or image fit are never reused.
    A plan from before image settings were recorded takes this run's."""
    plan = {"sources": sources, "tokenizers": tokenizer_fingerprint(tok_dir), "tokenizer_dir": str(tok_dir.resolve()),
            **(images or {})}
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("tokenizers") != plan["tokenizers"]:
            raise UserError(f"{out} is being prepared with another tokenizer set (fingerprint "
                            f"{old.get('tokenizers')}, {tok_dir} has {plan['tokenizers']}); use the same set or another --out")
        for key in (images or {}):
            if key in old and old[key] != plan[key]:
                raise UserError(f"{out} is being prepared with {key} {old[key]}, not {plan[key]}; "
                                f"use the same setting or another --out")
        if any(key not in old for key in (images or {})):
            old = {**old, **(images or {})}
            _write_json(path, old)
        if old.get("sources") != sources and parts > 1:
            raise UserError(f"{out} is being prepared from other input shards ({len(old.get('sources', []))} "
                            f"listed in {path}, {len(sources)} given); every part needs the same --input")
        if old.get("sources") == sources:
            return old
    _write_json(path, plan)
    return plan


def merge(out: str | Path, part_dirs: Iterable[str | Path] = ()) -> dict:
    """Write the manifest and stats of a folder whose parts are all done (`prepare --merge`).

    `part_dirs`: folders the parts wrote to instead of `out`; their shards are moved into `out`
    (the same input list and tokenizer set are checked). Raises UserError naming the missing
    shards when some part has not finished.
    """

    out = Path(out)
    dirs = [Path(d) for d in part_dirs]
    plan_dir = next((d for d in [out, *dirs] if (d / PLAN).is_file()), None)
    if plan_dir is None:
        raise UserError(f"nothing to merge: no {PLAN} in {out}" + (f" or {', '.join(map(str, dirs))}" if dirs else ""))
    plan = json.loads((plan_dir / PLAN).read_text())
    space = TokenSpace.load(plan_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if not (out / PLAN).is_file():
        _write_json(out / PLAN, plan)
        space.save(out / "token_space.json")
    for d in dirs:
        other = json.loads((d / PLAN).read_text()) if (d / PLAN).is_file() else {}
        if (other.get("sources"), other.get("tokenizers")) != (plan["sources"], plan["tokenizers"]):
            raise UserError(f"{d} was prepared from other input shards or another tokenizer set than {plan_dir}")
        TokenSpace.load(d).check_same(space, f"{d} vs {plan_dir}")
        for f in sorted((d / "shards").glob("*")):
            if f.suffix != ".tmp" and not (out / "shards" / f.name).exists():
                f.replace(out / "shards" / f.name)
    sources = plan["sources"]
    names = [f"{i:05d}" for i in range(len(sources))]
    done = {n: s for n, src in zip(names, sources) if (s := _shard_done(out / "shards", n, src)) is not None}
    missing = [n for n in names if n not in done]
    if missing:
        raise UserError(f"{len(missing)} of {len(names)} shards are not done yet (e.g. {', '.join(missing[:5])}); "
                        f"run the parts that hold them (--part i --parts N), then merge again")
    images = {k: plan[k] for k in ("image_mode", "max_image_tokens") if k in plan}
    return _finish(out, names, sources, done, Path(plan["tokenizer_dir"]), ids_dtype(space.vocab_size).str, 0.0, [],
                   images)


def _pool_context(threads: int, device: str):
    """Forked workers where that is safe, spawned ones elsewhere.

    A forked worker starts at once with the parent's imports; a spawned one imports PyTorch and the
    tokenizers' libraries again, about 3 s, a third of a 2,000-document prepare on 2 cores
    (docs/results.md). Forking is safe when each worker runs one thread on the CPU: a forked child
    hangs in GNU OpenMP (PyTorch's on Linux) only if it opens a parallel region of several threads
    after the parent used one, which is why PyTorch's DataLoader workers also run one thread.
    CUDA cannot be forked once initialised."""
    if threads == 1 and device == "cpu" and sys.platform == "linux":
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _run_tasks(tasks, tok_dir, workers, threads, show, n_done, n_total, done, device) -> None:
    bar = tqdm(desc="prepare", unit="doc", disable=not show, dynamic_ncols=True)
    bar.set_postfix_str(f"shards {n_done}/{n_total}")
    if workers == 1:
        # in-process: no pool start-up cost, and tracebacks stay readable
        counter = _LocalCounter()
        old_threads = None

        old_threads = torch.get_num_threads()
        _init_worker(tok_dir, threads, None, device)
        _WORKER["progress"] = counter
        try:
            for task in tasks:
                res = _prepare_shard(task)
                done[res["name"]] = res
                bar.update(counter.value - bar.n)
                bar.set_postfix_str(f"shards {len(done)}/{n_total}")
        finally:
            _WORKER.clear()
            torch.set_num_threads(old_threads)
        bar.close()
        return
    ctx = _pool_context(threads, device)
    value = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok_dir, threads, value, device)) as pool:
        it = pool.imap_unordered(_prepare_shard, tasks)
        while True:
            try:
                res = it.next(timeout=0.5)
            except mp.TimeoutError:
                bar.update(value.value - bar.n)
                continue
            except StopIteration:
                break
            done[res["name"]] = res
            bar.update(value.value - bar.n)
            bar.set_postfix_str(f"shards {len(done)}/{n_total}")
    bar.close()


class _LocalCounter:
    """The single-process stand-in for the shared progress counter."""

    def __init__(self):
        self.value = 0

    def get_lock(self):
        return contextlib.nullcontext()


def _finish(out: Path, names, sources, done, tok_dir: Path | None, dtype: str, seconds: float, new: list[str],
            images: dict | None = None) -> dict:
    kinds: list[str] = []
    total = {"docs": 0, "tokens": 0, "tokens_by_modality": {m: 0 for m in MODALITY_NAMES},
             "docs_by_kind": {}, "bad": {}, "max_doc_tokens": 0}
    for name in names:
        s = done[name]
        total["docs"] += s["docs"]
        total["tokens"] += s["tokens"]
        total["max_doc_tokens"] = max(total["max_doc_tokens"], s["max_doc_tokens"])
        for k, v in s["tokens_by_modality"].items():
            total["tokens_by_modality"][k] = total["tokens_by_modality"].get(k, 0) + v
        for k, v in s["docs_by_kind"].items():
            total["docs_by_kind"][k] = total["docs_by_kind"].get(k, 0) + v
            if k not in kinds:
                kinds.append(k)
        for k, v in s["bad"].items():
            total["bad"][k] = total["bad"].get(k, 0) + v
    if total["docs"] == 0:
        raise UserError(f"no usable documents in {len(sources)} raw shard(s); bad records: {total['bad']}")
    new_docs = sum(done[n]["docs"] for n in new)
    stats = {**total, "shards": len(names), "bad_total": sum(total["bad"].values()),
             "seconds": round(seconds, 3), "shards_this_run": len(new),
             "docs_per_second": round(new_docs / seconds, 2) if new and seconds > 0 else None}
    images = {"image_mode": None, "max_image_tokens": None, **(images or {})}
    stats.update(images)
    _write_json(out / "stats.json", stats)
    manifest = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "shards": names,
                "sources": sources, "tokenizers": str(Path(tok_dir).resolve()) if tok_dir else "", "kinds": kinds,
                "docs": total["docs"], "tokens": total["tokens"], **images}
    _write_json(out / "manifest.json", manifest)
    return stats


def write_token_dataset(out: str | Path, space, docs: Iterable, docs_per_shard: int = 0,
                        tokenizers: str | Path | None = None) -> dict:
    """Write already-tokenized documents `(ids, modality, kind)` in the token-shard format.

    For synthetic corpora, tests and benchmarks (no raw shards, no tokenizers needed);
    `docs_per_shard` = 0 puts everything in one shard.
    """
    out = Path(out)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    space.save(out / "token_space.json")
    dtype = ids_dtype(space.vocab_size)
    names: list[str] = []
    done: dict[str, dict] = {}
    writer = stats = None

    def close():
        s = stats
        writer.close({"name": names[-1], "source": "synthetic", "docs": s.docs, "tokens": s.tokens,
                      "tokens_by_modality": s.tokens_by_modality, "docs_by_kind": s.docs_by_kind,
                      "bad": {}, "max_doc_tokens": s.max_doc_tokens, "seconds": 0.0})
        done[names[-1]] = json.loads((shard_dir / f"{names[-1]}.json").read_text())

    for ids, modality, kind in docs:
        if writer is None or (docs_per_shard and stats.docs >= docs_per_shard):
            if writer is not None:
                close()
            names.append(f"{len(names):05d}")
            writer, stats = ShardWriter(shard_dir, names[-1], dtype), _ShardStats()
        ids = np.asarray(ids, dtype=np.int64)
        modality = np.asarray(modality, dtype=np.uint8)
        writer.add(ids, modality, kind, conditioning_span(kind, ids, space))
        stats.docs += 1
        stats.tokens += len(ids)
        stats.max_doc_tokens = max(stats.max_doc_tokens, len(ids))
        for m, c in zip(MODALITY_NAMES, np.bincount(modality, minlength=len(MODALITY_NAMES))):
            stats.tokens_by_modality[m] += int(c)
        stats.docs_by_kind[kind] = stats.docs_by_kind.get(kind, 0) + 1
    if writer is None:
        raise UserError("no documents to write")
    close()
    return _finish(out, names, ["synthetic"] * len(names), done, tokenizers, dtype.str, 0.0, [])

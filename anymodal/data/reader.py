"""Read raw interleaved corpora (webdataset .tar shards) into `RawDocument`s.

A shard holds samples `KEY.json` + media `KEY.0.png`, `KEY.1.wav`, ... (the raw format of docs/world.md).
Also read: OBELICS-style records (parallel `texts` / `images` lists, images as file names inside
the tar or base64 bytes), MMC4-style records (`text_list` + `image_info`), and plain
image-caption pairs (`KEY.jpg` + `KEY.txt`, the img2dataset layout).

Shards may be given as a path, a folder, a glob, a brace pattern (`data/train-{00000..00009}.tar`),
a URL webdataset opens (`http(s)://…` through curl with retries, `gs://…` through gsutil), a
`pipe:` command (`pipe:aws s3 cp s3://bucket/train-00000.tar -`), or a list of these. webdataset
streams each tar and groups its files by key, opens the URLs (optionally through a local
`cache_dir`), resamples shards and shuffles a buffer of documents; the record adapters, the media
decoding, the split between ranks and DataLoader workers (deterministic for a seed) and the error
accounting are ours. When there are fewer shards than readers, every reader walks all shards and
keeps every n-th sample, or (`resampled=True`) draws shards at random for an epoch of documents.

A bad record (undecodable image or audio, invalid JSON, a box outside its image, a segment naming
a missing file, empty audio) is skipped with one warning line naming shard and key, and counted
by reason in a `RecordCounter`; a shard that cannot be opened or breaks off (a truncated file, a
dropped connection) is one "bad shard". With `strict=True` the first one raises `UserError`.
webdataset is imported where it is used: it imports torch, which text-only readers need not load.
"""

from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import itertools
import json
import logging
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset.cache import FileCache
from webdataset.filters import shuffle as buffer_shuffle
from webdataset.gopen import gopen
from webdataset.shardlists import ResampledShards
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..errors import UserError
from .media import (
    BAD_BOX,
    BAD_JSON,
    BAD_SEGMENT,
    IMAGE_MODES,
    MISSING_FILE,
    BadRecord,
    fit_image,
    load_audio,
    open_image,
)

log = logging.getLogger("anymodal.data")

BAD_SHARD = "bad shard"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "opus")

__all__ = ["BadRecord", "RecordCounter", "RawDocument", "expand_shards", "iter_documents", "iter_images",
           "iter_audio", "decode_sample", "iter_samples"]


@dataclass
class RawDocument:
    """One decoded document. Segments: {"text": str} | {"image": uint8 [H, W, 3]} |
    {"audio": float32 [T]} | {"box": (x1, y1, x2, y2) in [0, 1], "image_index": i}."""

    key: str
    shard: str
    kind: str
    segments: list[dict]
    meta: dict = field(default_factory=dict)

    @property
    def images(self) -> list[np.ndarray]:
        return [s["image"] for s in self.segments if "image" in s]

    @property
    def audio(self) -> list[np.ndarray]:
        return [s["audio"] for s in self.segments if "audio" in s]

    @property
    def text(self) -> str:
        return "".join(s["text"] for s in self.segments if "text" in s)


class RecordCounter:
    """Counts good documents and skipped records by reason; `report()` gives one summary line."""

    def __init__(self):
        self.good = 0
        self.bad: Counter[str] = Counter()

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def skip(self, shard: str, key: str, err: BadRecord) -> None:
        self.bad[err.reason] += 1
        log.warning("skipping bad record %s in %s: %s", key, shard, err)

    def as_dict(self) -> dict:
        return {"good": self.good, "bad": dict(self.bad)}

    def report(self) -> str:
        line = f"read {self.good} documents"
        if self.bad:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.bad.items()))
            line += f"; skipped {self.total_bad} bad records ({reasons})"
        return line


# ------------------------------------------------------------------------------------- shards


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def expand_shards(shards: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Paths, folders, globs, brace patterns and `pipe:` urls -> an ordered list of shard urls."""

    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    for item in items:
        s = os.fspath(item)
        if s.startswith("pipe:"):
            out.append(s)
            continue
        if _URL.match(s):  # remote: nothing to check here, the opener reports what it cannot read
            out.extend(braceexpand(s))
            continue
        s = s[len("file:"):] if s.startswith("file:") else s
        for pat in braceexpand(s):
            if any(ch in pat for ch in "*?["):
                found = sorted(glob.glob(pat))
                if not found:
                    raise UserError(f"no shards match {pat}")
                out.extend(found)
            elif os.path.isdir(pat):
                found = sorted(str(p) for p in Path(pat).iterdir()
                               if p.name.endswith((".tar", ".tar.gz", ".tgz")))
                if not found:
                    raise UserError(f"no .tar shards in folder {pat}")
                out.extend(found)
            elif os.path.isfile(pat):
                out.append(pat)
            else:
                raise UserError(f"shard not found: {pat}")
    if not out:
        raise UserError(f"no shards given ({shards!r})")
    return out


class _ShardErrors:
    """webdataset's error handler for one shard: count (or, strict, raise) and go on, never sleep."""

    def __init__(self, counter: RecordCounter | None, strict: bool, url: str):
        self.counter, self.strict, self.url = counter, strict, url
        self.failed = False

    def __call__(self, exn: BaseException) -> bool:
        self.failed = True
        msg = str(exn.args[0]) if getattr(exn, "args", None) else str(exn)
        _bad(self.counter, self.strict, self.url, "-", BadRecord(BAD_SHARD, f"unreadable from here on: {msg[:200]}"))
        return False  # the rest of this shard is lost; the reader goes on with the next shard


def open_shard(url: str, cache_dir: str | os.PathLike | None = None):
    """A byte stream of one shard through webdataset's openers: local paths, `pipe:` commands,
    http(s) (curl, with retries), gs:// (gsutil) …; remote shards are downloaded whole into
    `cache_dir` first when one is given (and read from there the next time)."""

    if cache_dir is not None and "://" in url:
        cache = FileCache(str(cache_dir), url_to_name=_cache_name, validator=None)
        return open(cache.get_file(url), "rb")
    return gopen(url)


def _cache_name(url: str) -> str:
    """The cached file of a URL: its base name, prefixed by a hash so that two hosts never collide."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    return f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{base}"


def iter_samples(url: str, counter: RecordCounter | None = None, strict: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> Iterator[dict]:
    """Raw samples of one shard: {"__key__": key, "__shard__": url, ext: bytes, ...}.

    webdataset streams the tar and groups its files by key; a shard that cannot be opened or
    breaks off (a truncated file, a dropped connection, a command that fails) is one counted bad
    shard: what was read before it stays, the sample in progress is lost.
    """

    errors = _ShardErrors(counter, strict, url)
    try:
        stream = open_shard(url, cache_dir)
    except Exception as e:  # any opener failure is this shard's
        errors(e)
        return
    finished = False
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=errors, eof_value=None)
        held = None  # one sample behind: the last one may be cut off by an error
        for sample in group_by_keys(files, lcase=False, handler=errors):
            if held is not None:
                yield held
            sample["__shard__"] = url
            held = sample
        if held is not None and not errors.failed:
            yield held
        finished = True
    finally:
        proc = getattr(stream, "proc", None)
        if proc is not None and not finished:
            proc.kill()  # the consumer stopped early: stop the command as well
        try:
            stream.close()
        except Exception as e:  # a command's failing exit status, after its data
            if finished and not errors.failed:
                errors(e)


def _bad(counter: RecordCounter | None, strict: bool, shard: str, key: str, err: BadRecord) -> None:
    if strict:
        raise UserError(f"bad record {key} in {shard}: {err}")
    (counter if counter is not None else RecordCounter()).skip(shard, key, err)


# ----------------------------------------------------------------------------------- decoding


def _member(sample: dict, name: str, exts: Sequence[str], what: str) -> bytes:
    """The bytes a segment names: a member of this sample ("0.png", "KEY.0.png", "a/KEY.0.png"),
    or embedded base64 (optionally a `data:` URI)."""
    if not isinstance(name, str) or not name:
        raise BadRecord(BAD_SEGMENT, f"{what} reference {name!r} is not a file name")
    key = sample["__key__"]
    base = key.rsplit("/", 1)[-1]
    for cand in (name, name.rsplit("/", 1)[-1]):
        for prefix in (key + ".", base + "."):
            if cand.startswith(prefix):
                cand = cand[len(prefix):]
        if cand in sample and not cand.startswith("__"):
            return sample[cand]
    payload = name.split(",", 1)[1] if name.startswith("data:") and "," in name else name
    if len(payload) >= 16 and "." not in payload[-6:]:
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise BadRecord(MISSING_FILE, f"{what} file {name[:60]!r} is not in the sample")


def _embedded(value, sample: dict, exts: Sequence[str], what: str) -> bytes:
    """An image/audio reference that may be a name, base64 text, or {"bytes"|"path": ...}."""
    if isinstance(value, dict):
        if "bytes" in value:
            b = value["bytes"]
            if isinstance(b, str):
                try:
                    return base64.b64decode(b, validate=True)
                except (binascii.Error, ValueError):
                    raise BadRecord(BAD_SEGMENT, f"{what} bytes are not valid base64") from None
            raise BadRecord(BAD_SEGMENT, f"{what} bytes must be base64 text in JSON")
        for k in ("path", "name", "file", "image_name"):
            if k in value:
                return _member(sample, value[k], exts, what)
        raise BadRecord(BAD_SEGMENT, f"{what} entry has no bytes or path")
    return _member(sample, value, exts, what)


class _Decoder:
    def __init__(self, image_size, image_mode, sample_rate, max_audio_seconds, images, audio,
                 image_factor=8, max_image_tokens=None, image_max_side=64):
        self.image_size, self.image_mode, self.sample_rate = image_size, image_mode, sample_rate
        self.max_audio_seconds = max_audio_seconds
        self.want_images, self.want_audio = images, audio
        self.fit_args = {"factor": image_factor, "max_tokens": max_image_tokens, "max_side": image_max_side}

    def document(self, sample: dict) -> RawDocument | None:
        key, shard = sample["__key__"], sample["__shard__"]
        if "json" not in sample:
            return self._pair(sample)
        try:
            rec = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRecord(BAD_JSON, str(e).splitlines()[0]) from None
        if not isinstance(rec, dict):
            raise BadRecord(BAD_JSON, "top level is not an object")
        if "segments" in rec:
            raw, kind, meta = rec["segments"], rec.get("kind", "doc"), rec.get("meta", {})
        elif "texts" in rec and "images" in rec:
            raw, kind, meta = self._obelics(rec), rec.get("kind", "interleaved"), rec.get("metadata", {})
        elif "text_list" in rec:
            raw, kind, meta = self._mmc4(rec), rec.get("kind", "interleaved"), rec.get("meta", {})
        elif any(e in sample for e in IMAGE_EXTS) and "txt" in sample:
            return self._pair(sample, meta=rec)
        else:
            raise BadRecord(BAD_JSON, "no 'segments' (or 'texts'/'images', 'text_list') in the record")
        if not isinstance(raw, list) or not raw:
            raise BadRecord(BAD_SEGMENT, "segments must be a non-empty list")
        segs = self._segments(raw, sample)
        if not segs:
            return None  # nothing of what the caller asked for (e.g. text only, and this is an image)
        return RawDocument(key, shard, str(kind), segs, meta if isinstance(meta, dict) else {})

    def _segments(self, raw: list, sample: dict) -> list[dict]:
        out: list[dict] = []
        fits = []  # per image: how its pixel boxes map onto the converted image
        boxes = []
        for seg in raw:
            if not isinstance(seg, dict) or len({"text", "image", "audio", "box"} & seg.keys()) != 1:
                raise BadRecord(BAD_SEGMENT, f"segment {str(seg)[:60]} is not one of text/image/audio/box")
            if "text" in seg:
                if not isinstance(seg["text"], str):
                    raise BadRecord(BAD_SEGMENT, "text segment is not a string")
                out.append({"text": seg["text"]})
            elif "image" in seg:
                data = _embedded(seg["image"], sample, IMAGE_EXTS, "image")
                if self.want_images:  # else only checked to exist (iter_audio skips the decode)
                    arr, fit = fit_image(open_image(data), self.image_size, self.image_mode, **self.fit_args)
                    fits.append(fit)
                    out.append({"image": arr})
            elif "audio" in seg:
                data = _embedded(seg["audio"], sample, AUDIO_EXTS, "audio")
                if self.want_audio:
                    out.append({"audio": load_audio(data, self.sample_rate, self.max_audio_seconds)})
                elif not data:
                    raise BadRecord("empty audio", "empty file")
            else:
                boxes.append((len(out), seg, len(fits)))
                out.append(None)  # filled once all images are known
        if self.want_images:  # boxes need the image sizes; without images they are dropped
            for pos, seg, n_before in boxes:
                out[pos] = self._box(seg, fits, n_before)
        return [s for s in out if s is not None]  # may be empty when only unwanted media were there

    def _box(self, seg: dict, fits: list, n_before: int) -> dict:
        b = seg["box"]
        idx = seg.get("image_index", n_before - 1)
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise BadRecord(BAD_SEGMENT, f"box {str(b)[:40]} is not [x1, y1, x2, y2]")
        if not isinstance(idx, int) or not 0 <= idx < len(fits):
            raise BadRecord(BAD_BOX, f"box refers to image {idx} but the record has {len(fits)}")
        fit = fits[idx]
        w, h = fit.src_size
        x1, y1, x2, y2 = (float(v) for v in b)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise BadRecord(BAD_BOX, f"box {list(b)} outside image {idx} of {w}x{h}")
        return {"box": tuple(float(v) for v in fit.box(x1, y1, x2, y2)), "image_index": idx}

    def _obelics(self, rec: dict) -> list[dict]:
        texts, images = rec["texts"], rec["images"]
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise BadRecord(BAD_JSON, "'texts' and 'images' must be lists of the same length")
        segs = []
        for t, im in zip(texts, images):
            if im is not None:
                segs.append({"image": im})
            if t is not None:
                if not isinstance(t, str):
                    raise BadRecord(BAD_SEGMENT, "an entry of 'texts' is not a string")
                segs.append({"text": t})
        return segs

    def _mmc4(self, rec: dict) -> list[dict]:
        texts, infos = rec["text_list"], rec.get("image_info", [])
        if not isinstance(texts, list) or not isinstance(infos, list):
            raise BadRecord(BAD_JSON, "'text_list' and 'image_info' must be lists")
        before: dict[int, list] = {}
        for info in infos:
            if not isinstance(info, dict):
                raise BadRecord(BAD_JSON, "an 'image_info' entry is not an object")
            ref = info.get("image_bytes") or info.get("image_base64") or info.get("image_name")
            before.setdefault(int(info.get("matched_text_index", 0)), []).append(ref)
        segs = []
        for i, t in enumerate(texts):
            segs += [{"image": r} for r in before.get(i, [])]
            segs.append({"text": t})
        return segs

    def _pair(self, sample: dict, meta: dict | None = None) -> RawDocument:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "txt" not in sample:
            raise BadRecord(BAD_JSON, "sample has no .json (and is not an image + .txt pair)")
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadRecord(BAD_SEGMENT, "caption is not UTF-8") from None
        segs = self._segments([{"image": ext}, {"text": text}], sample)
        if not segs:
            return None
        return RawDocument(sample["__key__"], sample["__shard__"], "pair", segs, meta or {})


def decode_sample(sample: dict, image_size: int | None = 64, image_mode: str = "resize",
                  sample_rate: int = 16000, max_audio_seconds: float | None = None, image_factor: int = 8,
                  max_image_tokens: int | None = None, image_max_side: int = 64) -> RawDocument:
    """One raw sample (as from `iter_samples`) -> `RawDocument`; raises `BadRecord`."""
    _check_image_args(image_size, image_mode, image_factor, max_image_tokens)
    dec = _Decoder(image_size, image_mode, sample_rate, max_audio_seconds, True, True, image_factor,
                   max_image_tokens, image_max_side)
    return dec.document(sample)  # type: ignore[return-value]


def _check_image_args(image_size, image_mode, image_factor, max_image_tokens) -> None:
    if image_mode not in IMAGE_MODES:
        raise UserError(f"image mode must be one of {', '.join(IMAGE_MODES)}, not {image_mode!r}")
    if image_mode == "native":
        if image_factor < 1:
            raise UserError(f"image_factor must be at least 1, got {image_factor}")
        if max_image_tokens is None and not image_size:
            raise UserError("native image mode needs max_image_tokens (or image_size to derive it from)")
        if max_image_tokens is not None and max_image_tokens < 1:
            raise UserError(f"max_image_tokens must be at least 1, got {max_image_tokens}")


# -------------------------------------------------------------------------------- iteration


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the torch DataLoader worker we run in, else (0, 1)."""
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is None:
        return 0, 1
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def iter_documents(shards, image_size: int | None = 64, image_mode: str = "resize", sample_rate: int = 16000,
                   rank: int = 0, world_size: int = 1, strict: bool = False,
                   counter: RecordCounter | None = None, shuffle: bool = False, seed: int = 0,
                   kinds: Sequence[str] | None = None, max_audio_seconds: float | None = None,
                   images: bool = True, audio: bool = True, shuffle_buffer: int = 512,
                   decode_media: bool = True, resampled: bool = False, epoch_docs: int | None = None,
                   cache_dir: str | os.PathLike | None = None, image_factor: int = 8,
                   max_image_tokens: int | None = None, image_max_side: int = 64) -> Iterator[RawDocument]:
    """Decoded documents of this rank's (and DataLoader worker's) share of the shards.

    Images are fitted by `image_mode` (`media.fit_image`): resize / letterbox to `image_size`
    squared, or native: each keeps its aspect on the grid of at most `max_image_tokens` codes of
    `image_factor` pixels (default `(image_size // image_factor) ** 2`), sides at most
    `image_max_side` codes. Boxes are mapped through the same fit, so native boxes keep their
    normalized coordinates (each axis relative to the image's own width and height).

    `kinds` keeps only documents of those kinds; `images=False` / `audio=False` skip decoding
    (and drop) image / audio segments; `decode_media=False` does both (text only, and boxes are
    dropped with their images). With `shuffle`, shard order and a buffer of documents are
    shuffled (the same `seed` on every rank keeps the shard partition consistent).
    `resampled`: every reader draws shards at random with replacement (webdataset's
    `ResampledShards`, seeded by `seed` and the reader's index) and stops after `epoch_docs`
    documents, so no reader runs dry when there are fewer shards than readers. `cache_dir`:
    remote shards are downloaded there once and read locally after.
    """
    if not decode_media:
        images = audio = False
    _check_image_args(image_size, image_mode, image_factor, max_image_tokens)
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, {world_size})")
    urls = expand_shards(shards)
    if shuffle:
        random.Random(seed).shuffle(urls)
    wid, nw = _worker()
    readers, me = world_size * nw, rank * nw + wid
    if resampled:
        if not epoch_docs or epoch_docs < 1:
            raise UserError("resampled shards need epoch_docs (documents per reader and epoch)")
        draws = ResampledShards(urls, seed=seed, worker_seed=lambda: me, deterministic=True)
        mine, stride = (d["url"] for d in draws), 1
    elif len(urls) >= readers:  # as webdataset's split_by_node + split_by_worker, for explicit ranks
        mine, stride = urls[me::readers], 1
    else:
        mine, stride = urls, readers  # too few shards: split by sample instead
    own = counter is None
    counter = RecordCounter() if own else counter
    dec = _Decoder(image_size, image_mode, sample_rate, max_audio_seconds, images, audio, image_factor,
                   max_image_tokens, image_max_side)
    kinds_set = set(kinds) if kinds is not None else None

    def decoded() -> Iterator[RawDocument]:
        j = -1
        for url in mine:
            for sample in iter_samples(url, counter, strict, cache_dir):
                j += 1
                if stride > 1 and j % stride != me:
                    continue
                try:
                    doc = dec.document(sample)
                except BadRecord as e:
                    _bad(counter, strict, url, sample["__key__"], e)
                    continue
                if doc is None or (kinds_set is not None and doc.kind not in kinds_set):
                    continue
                counter.good += 1
                yield doc

    it = decoded()
    if resampled:
        it = itertools.islice(it, epoch_docs)
    if shuffle:
        it = buffer_shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(f"{seed}-{me}"))(it)
    yield from it
    if counter.total_bad:
        where = "resampled shards" if resampled else ", ".join(mine) if len(mine) <= 3 else f"{len(mine)} shards"
        log.warning("%s (%s)", counter.report(), where)


def iter_images(shards, image_size: int | None = 64, image_mode: str = "resize", **kw) -> Iterator[np.ndarray]:
    """Every image (uint8 [H, W, 3]: [size, size, 3] unless native) of the documents; audio is not decoded."""
    for doc in iter_documents(shards, image_size=image_size, image_mode=image_mode, audio=False, **kw):
        yield from doc.images


def iter_audio(shards, sample_rate: int = 16000, **kw) -> Iterator[np.ndarray]:
    """Every audio clip (float32 [T] at `sample_rate`); images are not decoded."""
    for doc in iter_documents(shards, sample_rate=sample_rate, images=False, **kw):
        yield from doc.audio

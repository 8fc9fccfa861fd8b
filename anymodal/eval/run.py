"""`anymodal eval`: measure a bundle on a validation split with the demo world's metrics (docs/world.md).

Documents are read with the data reader, cut at `meta.prompt_segments` into the prompt (what the
model is given) and the truth, and grouped by kind. Each kind's prompts are generated in batches by
the sampling engine, with the grammar forcing the span the task asks for:

    t2i / a2i   prompt, then forced `<boi>`: one image of the model's own grid (version-2 token
                spaces: it picks the size tokens), decoded at that grid and checked by the image
                check at its own size; whether its aspect is the one asked is reported beside.
                Where the answer begins with text (an a2i answer that first says what was heard:
                world `a2i_answer: transcript_image`), the model first writes it (greedy, up to
                `<boi>`), and the image follows what it wrote
    i2t         image + "describe:", then text until `</s>` (greedy): caption accuracy
    ground      "find <ref>…</ref>" + image, then forced `<box>` (greedy locations): Acc@0.5, mean IoU
    refer       image + "what is at" + box, then text (greedy): refer accuracy
    asr         audio + "transcribe:", then text (greedy): corpus WER against the transcript
    tts         "say: …", then forced `<boa>`: the clip is decoded to a waveform, re-tokenized and
                transcribed by the model itself (the asr prompt with the first ASR cue); WER
                against the text

Prompts carry the documents' task cues (docs/world.md), exactly as training saw them.

Images and clips are sampled (per-document fixed seeds) with classifier-free guidance; text and
locations are greedy. Bits per token per modality are measured by teacher forcing on every
document read (all kinds, including story and prose). Every metric is also reported on the
documents whose scenes hold an unseen colour+shape pair (`meta.unseen`), and the image-text tasks
per aspect of their scene (`by_aspect`: square, wide, tall, and non_square for the two together;
a world document's aspect is its `meta.canvas`, square when absent). Images are read as the image
tokenizer takes them (`reader_args`: native tokenizers keep each image's aspect).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.checker import analyse_image, caption_correct, image_aspect, refer_correct
from ..data.cues import cue
from ..data.media import native_grid
from ..data.reader import RecordCounter, iter_documents
from ..data.scenes import aspect_word
from ..errors import UserError
from ..fileio import write_atomic
from ..kernels import install as install_kernels
from ..modality import MODALITY_NAMES
from ..model.loss import lm_loss
from ..sample.engine import Engine, Request
from ..sample.prompt import audio_codes, image_codes
from ..sample.render import decode_audio, decode_images
from ..sample.sampling import DEFAULT_CFG, ModalitySampling, SamplingParams
from ..tokenizers.stream import Audio, Box, Image, Text
from ..tokenizers.stream import iou as box_iou
from .metrics import Metrics, by_aspect, format_table, image_check

GEN_KINDS = ("t2i", "a2i", "i2t", "ground", "refer", "asr", "tts")


@dataclass
class EvalOptions:
    limit: int | None = None  # documents per kind (None = all)
    batch_size: int = 8
    seed: int = 0
    cfg: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CFG))  # guidance per modality
    max_text_tokens: int = 160  # 3-object captions are ~90 tokens with a tiny BPE vocab
    bits_docs: int | None = None  # documents for bits per token (None = every document read)
    progress: bool = True
    tasks: tuple[str, ...] = GEN_KINDS  # the generation tasks to run
    sampling: ModalitySampling | None = None  # None = eval_sampling()
    examples: str | Path | None = None  # JSON lines, one per generated answer (None = not written)


def eval_sampling() -> ModalitySampling:
    """Greedy text and boxes; images and audio sampled with top-k (with fixed seeds)."""
    s = ModalitySampling.default()
    s.text = SamplingParams(0.0, 0, 1.0)
    s.loc = SamplingParams(0.0, 0, 1.0)
    return s


def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i: i + n]


class Evaluator:
    def __init__(self, bundle, opts: EvalOptions):
        self.b, self.o = bundle, opts
        self.sp = bundle.space
        self.tok = bundle.tok
        # the most codes an image may take: the grammar lets the model choose any grid within it
        self.max_image_tokens = bundle.tok.image.max_tokens if bundle.tok.image is not None else None
        self.engine = self._engine()
        self.metrics = Metrics()
        self.sampling = opts.sampling or eval_sampling()
        self.bar = None
        self.over_context = 0  # documents whose prompt leaves no room for the answer
        self.examples: list[dict] = []  # one record per generated answer, for error analysis
        # prompt ids per document key: media are tokenized once, however often the docs are evaluated
        self._prompts: dict[str, list[int]] = {}

    def _engine(self) -> Engine:
        return Engine(self.b.model, self.sp, device=self.b.device, max_image_tokens=self.max_image_tokens)

    # ---- reading -----------------------------------------------------------------------------
    def read(self, data) -> tuple[dict[str, list], list, int]:
        """Documents per generation kind (up to limit each) and documents for bits per token.
        Images are fitted as the image tokenizer takes them (a native one keeps their aspect)."""

        tok = self.tok
        counter = RecordCounter()
        image_args = tok.image.cfg.model.reader_args() if tok.image is not None else {}
        rate = tok.audio.sample_rate if tok.audio is not None else 16000
        per_kind: dict[str, list] = {k: [] for k in GEN_KINDS}
        bits: list = []
        limit = self.o.limit
        bits_limit = self.o.bits_docs if self.o.bits_docs is not None else (
            None if limit is None else limit * (len(GEN_KINDS) + 2))
        try:
            docs = iter_documents(data, **image_args, sample_rate=rate, counter=counter,
                                  images=tok.image is not None, audio=tok.audio is not None)
            for doc in docs:
                usable = self._usable(doc)
                if usable and doc.kind in per_kind and (limit is None or len(per_kind[doc.kind]) < limit):
                    per_kind[doc.kind].append(doc)
                if usable and (bits_limit is None or len(bits) < bits_limit):
                    bits.append(doc)
                full = limit is not None and all(len(v) >= limit for v in per_kind.values())
                if full and bits_limit is not None and len(bits) >= bits_limit:
                    break
        except UserError:
            raise
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"cannot read eval data {data}: {e}") from None
        if not any(per_kind.values()) and not bits:
            raise UserError(f"no usable documents in {data}")
        return per_kind, bits, counter.total_bad

    def _usable(self, doc) -> bool:
        """A document whose media the bundle can tokenize (no audio tokenizer -> no audio docs)."""
        for s in doc.segments:
            if "image" in s and self.tok.image is None:
                return False
            if "audio" in s and self.tok.audio is None:
                return False
        return bool(doc.segments)

    # ---- stream helpers ----------------------------------------------------------------------------
    def segments(self, doc, upto: int | None = None) -> list:
        """Reader segments -> stream segments (media tokenized, batched per document)."""
        raw = doc.segments if upto is None else doc.segments[:upto]
        pics = [s["image"] for s in raw if "image" in s]
        codes = iter(image_codes(pics, self.tok.image) if pics else [])
        out = []
        for s in raw:
            if "text" in s:
                out.append(Text(s["text"]))
            elif "image" in s:
                out.append(Image(next(codes)))
            elif "audio" in s:
                out.append(Audio(audio_codes(s["audio"], self.tok.audio)))
            elif "box" in s:
                out.append(Box(*[float(v) for v in s["box"]]))
        return out

    def prompt(self, doc) -> list[int]:
        if doc.key not in self._prompts:
            n = int(doc.meta.get("prompt_segments", len(doc.segments) - 1))
            ids, _ = self.b.stream.encode(self.segments(doc, n), bos=True, eos=False)
            self._prompts[doc.key] = [int(i) for i in ids]
        return self._prompts[doc.key]

    def _fits(self, prompt: list[int], new: int) -> int:
        """New tokens that fit after the prompt (0 = the prompt alone fills the context)."""
        return max(0, min(new, self.engine.max_len - len(prompt)))

    def generate(self, prompts: list[list[int]], new: int | list[int], seeds: list[int], force=None,
                 cfg: float = 1.0, min_new: int | list[int] = 1, stop_ids=()) -> list:
        """One result per prompt; None where fewer than `min_new` (per prompt, or one for all)
        tokens fit after the prompt."""
        news = new if isinstance(new, list) else [new] * len(prompts)
        mins = min_new if isinstance(min_new, list) else [min_new] * len(prompts)
        reqs, idx = [], []
        for i, (p, n, s, least) in enumerate(zip(prompts, news, seeds, mins)):
            room = self._fits(p, n)
            # An answer that cannot fit (an image needs all its tokens) is not generated at all: the
            # document scores as a failure and is counted under n.over_context.
            if room < max(1, least):
                self.over_context += 1
                continue
            reqs.append(Request(p, room, self.sampling, seed=s, cfg_scale=cfg,
                                force=[force] if force is not None else (), stop_after_span=force is not None,
                                stop_ids=stop_ids))
            idx.append(i)
        results = [None] * len(prompts)
        for chunk in _batches(list(zip(idx, reqs)), self.o.batch_size):
            for (i, _), res in zip(chunk, self.engine.generate([r for _, r in chunk])):
                results[i] = res
        return results

    def text_of(self, tokens: list[int]) -> str:
        dec = self.b.stream.decode(tokens)
        return "".join(s.text for s in dec.segments if isinstance(s, Text))

    def example(self, task: str, doc, correct, **fields) -> None:
        """One answer for `examples.jsonl` (which document and aspect, whether it was right, what was said)."""
        objects = doc.meta.get("objects", ())
        self.examples.append({"task": task, "key": doc.key, "unseen": bool(doc.meta.get("unseen")),
                              "aspect": doc_aspect(doc), "objects": len(objects),
                              "scene": [_brief(o) for o in objects], "correct": bool(correct), **fields})

    def image_budget(self, doc) -> tuple[int, int]:
        """(new tokens, least room) for the image a t2i/a2i prompt asks for. Version 2: room for the
        longest grid the grammar lets the model choose (`image_max_span` of the tokenizer's
        `max_tokens`), and a document is only skipped when even the grid nearest the asked aspect
        cannot fit (the grammar closes an image after its h rows, so nothing forces more).
        Version 1: the one square grid."""
        sp = self.sp
        if not sp.any_aspect or self.max_image_tokens is None:
            return sp.image_tokens + 2, sp.image_tokens + 2
        w, h = doc.meta.get("canvas") or (1, 1)
        rows, cols = native_grid(int(w), int(h), self.max_image_tokens, sp.image_max_side)
        return sp.image_max_span(self.max_image_tokens), sp.image_span(rows, cols)

    def _tick(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    # ---- tasks ------------------------------------------------------------------------------------
    def image_task(self, kind: str, docs: list) -> None:
        sp = self.sp
        for chunk in _batches(docs, self.o.batch_size):
            prompts, said = self.say_first(chunk, [self.prompt(d) for d in chunk])
            seeds = [self.o.seed + hash_key(d.key) for d in chunk]
            budgets = [self.image_budget(d) for d in chunk]
            results = self.generate(prompts, [b[0] for b in budgets], seeds, force=sp.boi, cfg=self.o.cfg["image"],
                                    min_new=[b[1] for b in budgets])
            grids = []
            for res in results:
                dec = self.b.stream.decode(res.tokens) if res is not None else None
                img = [s for s in dec.segments if isinstance(s, Image)] if dec is not None else []
                grids.append(img[0].codes if img else None)
            # each image decoded at its own grid, and checked at its own size
            pics = iter(decode_images([g for g in grids if g is not None], self.tok.image))
            for i, (d, g) in enumerate(zip(chunk, grids)):
                pic = next(pics) if g is not None else None
                found = analyse_image(pic) if pic is not None else []
                drawn = image_aspect(pic) if pic is not None else None
                check = image_check(d.meta["objects"], found, asked=doc_aspect(d), drawn=drawn)
                self.metrics.add_image(kind, check, bool(d.meta.get("unseen")))
                self.example(kind, d, check["correct"], found=[_brief(o) for o in found], position=check["position"],
                             size=check["size"], aspect_match=check["aspect"], drawn_aspect=drawn,
                             grid=list(g.shape) if g is not None else None,
                             **({"said": said[i]} if said[i] is not None else {}))
            self._tick(len(chunk))

    def say_first(self, docs: list, prompts: list[list[int]]) -> tuple[list[list[int]], list[str | None]]:
        """Image prompts for documents whose answer begins with text before its image (an a2i
        answer that first says what was heard): the model writes that text greedily, up to its
        `<boi>`, and the image is drawn after it. Returns (prompts, what each said or None)."""
        sp, said, out = self.sp, [None] * len(docs), list(prompts)
        # a prompt with no room left goes straight to its image, which counts it as over the context
        chain = [i for i, d in enumerate(docs)
                 if _answer_starts_with_text(d) and self._fits(prompts[i], self.o.max_text_tokens) > 0]
        results = self.generate([prompts[i] for i in chain], self.o.max_text_tokens, [self.o.seed] * len(chain),
                                stop_ids=(sp.boi,)) if chain else []
        for i, res in zip(chain, results):
            tokens = list(res.tokens) if res is not None else []
            while tokens and tokens[-1] in (sp.boi, sp.eos):  # the image is forced next
                tokens.pop()
            out[i], said[i] = prompts[i] + tokens, self.text_of(tokens)
        return out, said

    def text_task(self, kind: str, docs: list) -> None:
        for chunk in _batches(docs, self.o.batch_size):
            prompts = [self.prompt(d) for d in chunk]
            # a referring expression ends with </ref> (a document may go on with another query)
            stop = (self.sp.eref,) if kind == "refer" else ()
            results = self.generate(prompts, self.o.max_text_tokens, [self.o.seed] * len(chunk), stop_ids=stop)
            for d, res in zip(chunk, results):
                text = self.text_of(res.tokens) if res is not None else ""
                unseen = bool(d.meta.get("unseen"))
                if kind == "i2t":
                    ok = caption_correct(text, d.meta["objects"])
                    self.metrics.add_caption(ok, unseen)
                    self.example(kind, d, ok, output=text)
                elif kind == "refer":
                    target = d.meta["objects"][int(d.meta["target"])]
                    ok = refer_correct(text, target["colour"], target["shape"])
                    self.metrics.add_refer(ok, unseen)
                    self.example(kind, d, ok, output=text, target=_brief(target))
                else:  # asr
                    truth = d.meta.get("transcript") or _truth_text(d)
                    self.metrics.add_wer("asr", truth, text, unseen)
                    self.example(kind, d, text.strip() == truth.strip(), output=text, truth=truth)
            self._tick(len(chunk))

    def ground_task(self, docs: list) -> None:
        sp = self.sp
        for chunk in _batches(docs, self.o.batch_size):
            prompts = [self.prompt(d) for d in chunk]
            results = self.generate(prompts, 6, [self.o.seed] * len(chunk), force=sp.box, min_new=6)
            for d, res in zip(chunk, results):
                n = int(d.meta.get("prompt_segments", len(d.segments) - 1))
                truth = next(s["box"] for s in d.segments[n:] if "box" in s)  # the first query's answer
                boxes = [s for s in self.b.stream.decode(res.tokens).segments if isinstance(s, Box)] if res else []
                iou = box_iou(boxes[0], truth) if boxes else 0.0
                self.metrics.add_ground(iou, bool(d.meta.get("unseen")))
                self.example("ground", d, iou >= 0.5, iou=round(iou, 4), truth=[float(v) for v in truth],
                             output=[round(v, 2) for v in boxes[0].as_tuple()] if boxes else None)
            self._tick(len(chunk))

    def tts_task(self, docs: list) -> None:
        sp = self.sp
        for chunk in _batches(docs, self.o.batch_size):
            prompts = [self.prompt(d) for d in chunk]
            # Room for 1.5x the reference clip plus half a second before <eoa> is forced.
            news = []
            for d in chunk:
                ref = [s["audio"] for s in d.segments if "audio" in s]
                frames = math.ceil(len(ref[0]) / self.tok.audio.sample_rate * sp.audio_frame_rate) if ref else 50
                news.append(sp.audio_n_q * (frames * 3 // 2 + int(sp.audio_frame_rate) // 2) + 2)
            seeds = [self.o.seed + hash_key(d.key) for d in chunk]
            results = self.generate(prompts, news, seeds, force=sp.boa, cfg=self.o.cfg["audio"], min_new=sp.audio_n_q + 2)
            # The model's own ASR on its speech: waveform -> codec -> `<s><boa>…<eoa>transcribe:` -> text.
            asr_prompts = []
            for res in results:
                clips = [s for s in self.b.stream.decode(res.tokens).segments if isinstance(s, Audio)] if res else []
                if clips and clips[0].codes.shape[0] > 0:
                    wave = decode_audio(clips[0].codes, self.tok.audio)
                    codes = audio_codes(wave, self.tok.audio)
                    ids, _ = self.b.stream.encode([Audio(codes), Text(cue("asr"))], bos=True, eos=False)
                    asr_prompts.append([int(i) for i in ids])
                else:
                    asr_prompts.append(None)
            live = [p for p in asr_prompts if p is not None]
            texts = iter(self.generate(live, self.o.max_text_tokens, [self.o.seed] * len(live)))
            for d, p in zip(chunk, asr_prompts):
                res = next(texts) if p is not None else None
                hyp = self.text_of(res.tokens) if res is not None else ""
                truth = d.meta.get("transcript") or ""
                self.metrics.add_wer("tts", truth, hyp, bool(d.meta.get("unseen")))
                self.example("tts", d, hyp.strip() == truth.strip(), output=hyp, truth=truth)
            self._tick(len(chunk))

    @torch.inference_mode()
    def bits_task(self, docs: list) -> None:
        """Teacher-forced negative log-likelihood per modality, in bits per token."""

        model, max_len = self.b.model, self.engine.max_len
        dev = self.b.device
        encoded = []
        for d in docs:
            ids, mod = self.b.stream.encode(self.segments(d), bos=True, eos=True)
            encoded.append((ids[: max_len + 1], mod[: max_len + 1], bool(d.meta.get("unseen"))))
        # Batches of similar length: a short caption padded to a long speech document is wasted work.
        encoded.sort(key=lambda s: len(s[0]))
        for seqs in _batches(encoded, self.o.batch_size):
            T = max(len(s[0]) for s in seqs) - 1
            inp = torch.full((len(seqs), T), self.sp.pad, dtype=torch.long)
            labels = torch.full((len(seqs), T), -100, dtype=torch.long)
            mods = torch.zeros((len(seqs), T), dtype=torch.long)
            for i, (ids, mod, _) in enumerate(seqs):
                n = len(ids) - 1
                inp[i, :n] = torch.from_numpy(ids[:-1])
                labels[i, :n] = torch.from_numpy(ids[1:])
                mods[i, :n] = torch.from_numpy(mod[1:].astype(np.int64))
            logits = model(inp.to(dev))  # right padding: causal attention never looks at it
            for i, (_, _, unseen) in enumerate(seqs):
                out = lm_loss(logits[i: i + 1].float(), labels[i: i + 1].to(dev), mods[i: i + 1].to(dev))
                for name in MODALITY_NAMES:
                    self.metrics.add_bits(name, float(out.per_modality_sum[name]), int(out.per_modality_count[name]),
                                          unseen)
                self.metrics.add_bits_document(unseen)
            self._tick(len(seqs))

    # ---- all ---------------------------------------------------------------------------------------
    def run(self, data) -> dict:
        per_kind, bits, skipped = self.read(data)
        return self.run_docs(per_kind, bits, skipped, kinds=self.o.tasks)

    def refresh(self) -> None:
        """Rebuild the sampling engine from the model's current weights (a trainer's next pass)."""
        self.engine = self._engine()

    def run_docs(self, per_kind: dict[str, list], bits: list, skipped: int = 0, kinds=GEN_KINDS) -> dict:
        """Every metric on documents already read (`read`); only the generation tasks in `kinds`.
        Metrics start from zero, so a trainer can call this again on the same documents."""

        self.metrics, self.over_context, self.examples = Metrics(), 0, []
        total = sum(len(per_kind[k]) for k in kinds) + len(bits)
        self.bar = tqdm(total=total, desc="eval", unit="doc", disable=not self.o.progress or None, file=sys.stderr)
        try:
            for kind in kinds:
                docs = per_kind[kind]
                if not docs:
                    continue
                self.bar.set_postfix_str(kind)
                if kind in ("t2i", "a2i"):
                    self.image_task(kind, docs)
                elif kind == "ground":
                    self.ground_task(docs)
                elif kind == "tts":
                    self.tts_task(docs)
                else:
                    self.text_task(kind, docs)
            if bits:
                self.bar.set_postfix_str("bits")
                self.bits_task(bits)
        finally:
            self.bar.close()
        result = self.metrics.result()
        result["n"]["skipped_records"] = int(skipped)
        result["n"]["over_context"] = int(self.over_context)
        result["by_objects"] = by_objects(self.examples)
        result["by_aspect"] = by_aspect(self.examples)
        return result


def _answer_starts_with_text(doc) -> bool:
    """Whether a document's answer (the segments after its prompt) has text before its first image."""
    n = int(doc.meta.get("prompt_segments", len(doc.segments) - 1))
    answer = doc.segments[n:]
    return bool(answer) and "text" in answer[0] and any("image" in s for s in answer)


def by_objects(examples: list[dict]) -> dict[str, dict[str, float]]:
    """Share of right answers per task and number of objects in the scene (1, 2, 3, ...)."""
    tally: dict[str, dict[str, list[int]]] = {}
    for e in examples:
        if e["task"] in ("t2i", "a2i", "i2t", "ground", "refer") and e["objects"]:
            n = tally.setdefault(e["task"], {}).setdefault(str(e["objects"]), [0, 0])
            n[0] += int(e["correct"])
            n[1] += 1
    return {t: {k: round(c / m, 4) for k, (c, m) in sorted(v.items())} for t, v in tally.items()}


def doc_aspect(doc) -> str:
    """The aspect of a document's scene: its `meta.canvas` [width, height], square without one."""
    canvas = doc.meta.get("canvas")
    return aspect_word(int(canvas[0]), int(canvas[1])) if canvas else "square"


def _brief(obj: dict) -> str:
    """An object of the image check or of a scene as 'small red circle at top left'."""
    words = [obj.get("size"), obj.get("colour"), obj.get("shape")]
    where = obj.get("position")
    return " ".join(w for w in words if w) + (f" at {where}" if where else "")


def hash_key(key: str) -> int:
    """A stable per-document seed offset (Python's hash() is salted per process)."""

    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _truth_text(doc) -> str:
    n = int(doc.meta.get("prompt_segments", 1))
    return "".join(s.get("text", "") for s in doc.segments[n:])


def evaluate(bundle, data, out: str | Path | None = None, opts: EvalOptions | None = None,
             console=None) -> dict:
    """Run every metric on `data`; write `out` (metrics.json) atomically; print the table."""
    install_kernels()  # teacher-forced passes run the CPU fast paths, as in training
    opts = opts or EvalOptions()
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit must be >= 1, got {opts.limit}")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {opts.batch_size}")
    bad = [t for t in opts.tasks if t not in GEN_KINDS]
    if bad:
        raise UserError(f"--tasks: unknown task {bad[0]!r} (valid: {', '.join(GEN_KINDS)})")
    evaluator = Evaluator(bundle, opts)
    result = evaluator.run(data)
    if out is not None:
        write_atomic(Path(out), json.dumps(result, indent=1) + "\n")
    if opts.examples is not None:
        write_atomic(Path(opts.examples), "".join(json.dumps(e) + "\n" for e in evaluator.examples))
    print(format_table(result), file=console if console is not None else sys.stdout)
    return result


__all__ = ["EvalOptions", "Evaluator", "evaluate"]


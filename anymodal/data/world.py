"""The demo world corpus (docs/world.md): scenes, captions, boxes, speech and prose as raw shards.

`generate_world(out, split, docs, seed)` writes webdataset shards `{split}-00000.tar`, ... in the
raw format the reader understands, plus `{split}.json` (counts, shard list, config). Document `i`
depends only on (seed, split, i): its own RNG is seeded with `[seed, split_id, i]`, so a corpus
of N documents is a prefix of one of 2N, train and val never share a stream, and shards can be
written in any order. Speech is batched per `speech_batch` documents in fresh processes (see
`speech.py`), so audio is deterministic too.

Segment layout per kind (`meta["prompt_segments"]` = how many leading segments are the prompt;
the rest is what a model should produce):

    t2i     text caption | image
    i2t     image, text cue "describe:" | text caption
    ground  text "find <ref>the blue square</ref>", image | box [, "find <ref>…</ref>", box …]
    refer   image, text cue "what is at", box | text "<ref>the blue square</ref>" [, cue, box, text …]
    asr     audio, text cue "transcribe:" | text transcript
    tts     text "say: ..." | audio
    a2i     audio (spoken caption), text cue "draw what you hear:" | image
            (a2i_answer "transcript_image": | text transcript, image)
    story   text caption, image, text "then ...", image [, text "then ...", image]   (prompt: 1)
    prose   text                                                                       (prompt: 0)

`meta` holds the truth: `objects` (of image 0 or of the spoken text), `frames` (story), `target`
(ground/refer object), `transcript`, `voice`, `speed`, `canvas` ([width, height] of a non-square
scene; absent for a square one) and `unseen` (true when any object is a colour+shape pair held out
of train). Cues come in a few phrasings each (`cues.CUES`), drawn per document.

Scenes are drawn on the canvases of `canvases` ("WxH" -> proportion): an image-bearing document
draws its canvas first, and the caption of a prompt that asks for a non-square image says "wide" or
"tall" (`scenes.ASPECT_LEAD_INS`). With one canvas (the default: `image_size` square) nothing is
drawn, so a square-only world writes the documents it always wrote.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import check_choice, load_config, to_dict
from ..errors import ConfigError, UserError
from ..fileio import write_atomic
from . import scenes as S
from .cues import CUES, cue
from .media import encode_png, encode_wav
from .speech import SpeechPool, Utterance, espeak_available

log = logging.getLogger("anymodal.data.world")

KINDS = ("t2i", "i2t", "ground", "refer", "asr", "tts", "a2i", "story", "prose")
AUDIO_KINDS = ("asr", "tts", "a2i")
A2I_ANSWERS = ("image", "transcript_image")
SPLITS = ("train", "val")
SPLIT_ID = {"train": 0, "val": 1}

DEFAULT_KINDS = {"t2i": 0.18, "i2t": 0.14, "ground": 0.12, "refer": 0.08, "asr": 0.12,
                 "tts": 0.08, "a2i": 0.08, "story": 0.08, "prose": 0.12}
DEFAULT_VOICES = ["en-us", "en", "en-us+f3", "en+f2", "en+m3", "en-gb-scotland", "en-029", "en-gb-x-rp"]
_CANVAS_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
INSTRUCTIONS = ("show me the {colour} {shape}", "find the {colour} {shape}",
                "draw a {size} {colour} {shape}", "where is the {colour} {shape}",
                "point to the {colour} {shape}")


@dataclass
class WorldConfig:
    """What the demo world looks like and how it is written (configs/world/demo.yaml)."""

    image_size: int = 64
    # Canvases "WxH" in pixels -> proportion (renormalized; 0 drops one), e.g. {"48x48": 0.9,
    # "64x48": 0.05, "48x64": 0.05}; given, they replace the image_size square for every image (the
    # scenes only spoken stay image_size square). Empty: every scene is image_size x image_size.
    canvases: dict[str, float] = field(default_factory=dict)
    max_objects: int = 3
    # Scenes (a story's first frame too) hold min_objects..max_objects objects, uniformly (a source
    # of many-object scenes sets it to 2); spoken scenes still hold at most speech_max_objects, and
    # instructions one object.
    min_objects: int = 1
    kinds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KINDS))
    unseen: list[str] = field(default_factory=lambda: ["purple triangle", "orange square"])
    val_unseen_fraction: float = 0.3  # share of val scene documents built around an unseen pair
    sample_rate: int = 16000
    voices: list[str] = field(default_factory=lambda: list(DEFAULT_VOICES))
    speed_min: int = 150  # words per minute
    speed_max: int = 210
    # Spoken captions describe at most this many objects: a 3-object caption takes ~8 s (1,600
    # audio tokens at 200/s), more than a training row and far more than its image.
    speech_max_objects: int = 2
    # a2i answers: "image" (the picture alone) or "transcript_image" (first what was said, then the
    # picture: speech -> text -> image in one answer, a chain of modalities as SpeechGPT's)
    a2i_answer: str = "image"
    # Objects in captions: "scene" (a random order) or "reading" (top row first, left to right, the
    # order a raster-order image draws them in).
    caption_order: str = "scene"
    # Each object's phrase: "object_first" ("a large red circle at the top left") or
    # "position_first" ("at the top left a large red circle"; scenes.PHRASE_ORDERS).
    phrase_order: str = "object_first"
    # The phrase order of captions that ask for an image (t2i, a2i, a story's first caption); empty:
    # phrase_order. Captions a model writes (i2t) and spoken texts keep phrase_order.
    prompt_phrase_order: str = ""
    # Box corners on multiples of `snap` pixels and sides on multiples of `side_step` (1: any).
    # With `snap` the image tokenizer's code size, an object of one shape and size is the same
    # codes wherever it sits (docs/world.md).
    snap: int = 1
    side_step: int = 1
    pitch_min: int = 35
    pitch_max: int = 65
    instruction_fraction: float = 0.4  # asr/tts texts that are short instructions, not captions
    story_max_images: int = 3
    # ground / refer documents ask about up to this many objects of their scene, one query and
    # answer after the other (the first is the eval target): more answers per image tokenized
    max_queries: int = 1
    # Train t2i prompts that leave words out: {word: share} over scenes.OMITTABLE (colour, size,
    # shape, position), each drawn per prompt; the picture still shows what the prompt leaves
    # unsaid. Prompts of varied detail, as text-to-image training sets mix short and full captions;
    # val prompts stay whole (the checks read them). Empty: no random number is spent on it.
    t2i_omit: dict[str, float] = field(default_factory=dict)
    prose_max_chars: int = 900
    shard_size: int = 1000
    speech_batch: int = 128  # documents per speech batch (fixed: audio depends on batch boundaries)
    speech_workers: int = 2

    def __post_init__(self):
        for k in self.kinds:
            check_choice("kinds", k, KINDS)
        if any(v < 0 for v in self.kinds.values()) or sum(self.kinds.values()) <= 0:
            raise ConfigError("config key 'kinds' needs non-negative weights with a positive sum")
        for pair in self.unseen:
            parts = pair.split()
            if len(parts) != 2 or parts[0] not in S.COLOURS or parts[1] not in S.SHAPES:
                raise ConfigError(f"config key 'unseen' entry {pair!r} is not 'colour shape' "
                                  f"(colours: {', '.join(S.COLOURS)}; shapes: {', '.join(S.SHAPES)})")
        if self.image_size < 24:
            raise ConfigError(f"config key 'image_size' is {self.image_size}; it must be at least 24")
        for name, weight in self.canvases.items():
            m = _CANVAS_RE.match(str(name))
            if m is None:
                raise ConfigError(f"config key 'canvases' entry {name!r} is not WIDTHxHEIGHT in pixels (e.g. 64x48)")
            if min(int(m[1]), int(m[2])) < 24:
                raise ConfigError(f"config key 'canvases' entry {name!r}: each side must be at least 24 pixels")
            if weight < 0:
                raise ConfigError(f"config key 'canvases' entry {name!r} has a negative proportion")
        if self.canvases and sum(self.canvases.values()) <= 0:
            raise ConfigError("config key 'canvases' needs non-negative proportions with a positive sum")
        if not 1 <= self.max_objects <= 3:
            raise ConfigError("config key 'max_objects' must be 1, 2 or 3")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(f"config key 'min_objects' is {self.min_objects}; it must lie in 1..max_objects "
                              f"({self.max_objects})")
        check_choice("a2i_answer", self.a2i_answer, A2I_ANSWERS)
        check_choice("phrase_order", self.phrase_order, S.PHRASE_ORDERS)
        if self.prompt_phrase_order:
            check_choice("prompt_phrase_order", self.prompt_phrase_order, S.PHRASE_ORDERS)
        if self.caption_order not in S.CAPTION_ORDERS:
            raise ConfigError(f"config key 'caption_order' is {self.caption_order!r}; it must be one of "
                              f"{', '.join(S.CAPTION_ORDERS)}")
        for key in ("snap", "side_step"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' is {getattr(self, key)}; it must be a whole number "
                                  "of pixels, at least 1")
        if self.speech_max_objects < 1:
            raise ConfigError("config key 'speech_max_objects' must be at least 1")
        if not 0.0 <= self.val_unseen_fraction <= 1.0 or not 0.0 <= self.instruction_fraction <= 1.0:
            raise ConfigError("fractions in the world config must lie in [0, 1]")
        if not self.voices:
            raise ConfigError("config key 'voices' must list at least one espeak-ng voice")
        if self.speed_min > self.speed_max or self.pitch_min > self.pitch_max:
            raise ConfigError("speed_min/pitch_min must not exceed speed_max/pitch_max")
        for word, share in self.t2i_omit.items():
            check_choice("t2i_omit", word, S.OMITTABLE)
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"config key 't2i_omit' entry {word!r} is {share}; it must lie in [0, 1]")
        if self.max_queries < 1:
            raise ConfigError("config key 'max_queries' must be at least 1")
        if self.story_max_images not in (2, 3):
            raise ConfigError("config key 'story_max_images' must be 2 or 3")
        for name in ("shard_size", "speech_batch", "speech_workers", "sample_rate", "prose_max_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be positive")

    @property
    def unseen_pairs(self) -> set[tuple[str, str]]:
        return {tuple(p.split()) for p in self.unseen}  # type: ignore[misc]

    def canvas_choices(self) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The canvases (width, height) with a positive proportion, and their probabilities."""
        if not self.canvases:
            return [(self.image_size, self.image_size)], np.ones(1)
        pairs = [(tuple(int(v) for v in _CANVAS_RE.match(k).groups()), w)  # type: ignore[union-attr]
                 for k, w in self.canvases.items() if w > 0]
        w = np.array([p[1] for p in pairs], dtype=np.float64)
        return [p[0] for p in pairs], w / w.sum()  # type: ignore[misc]


def load_world_config(path: str | None = None, overrides=()) -> WorldConfig:
    return load_config(WorldConfig, path or "world/demo.yaml", overrides)


# ------------------------------------------------------------------------------------- prose

PROSE_ASSET = Path(__file__).parent / "assets" / "prose.txt.gz"


@functools.cache
def prose_paragraphs() -> list[str]:
    """Paragraphs of real English, one per line of `assets/prose.txt.gz`.

    They were taken from Python 3.11.7's bundled documentation (`pydoc_data.topics`, PSF licence):
    running prose only (no code samples, tables, reST markup or `<tag>`-like words), 80 to 1500
    characters, ending a sentence. A file of their own keeps the world's documents the same under
    every Python version.
    """
    with gzip.open(PROSE_ASSET, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


# ------------------------------------------------------------------------------------ documents


@dataclass
class PlannedDoc:
    """A document before rendering: images are `Scene`s and audio is an `Utterance`."""

    key: str
    kind: str
    segments: list[dict]
    meta: dict


class _Planner:
    def __init__(self, cfg: WorldConfig, split: str, seed: int, audio: bool):
        self.cfg, self.split, self.seed = cfg, split, seed
        kinds = [k for k in KINDS if cfg.kinds.get(k, 0) > 0 and (audio or k not in AUDIO_KINDS)]
        if not kinds:
            raise UserError("the world config leaves no document kind to generate"
                            + ("" if audio else " without espeak-ng"))
        w = np.array([cfg.kinds[k] for k in kinds], dtype=np.float64)
        self.kinds, self.kind_p = kinds, w / w.sum()
        unseen = cfg.unseen_pairs
        self.all_pairs = {(c, s) for c in S.COLOURS for s in S.SHAPES}
        self.seen_pairs = self.all_pairs - unseen
        self.unseen_list = sorted(unseen)
        if not self.seen_pairs:
            raise ConfigError("config key 'unseen' holds out every colour+shape pair")
        self.canvases, self.canvas_p = cfg.canvas_choices()

    def canvas(self, rng) -> tuple[int, int]:
        """The canvas of a document's images. Drawn only when there is a choice: a world of one
        canvas spends no random numbers on it, so square-only configs keep their documents."""
        if len(self.canvases) == 1:
            return self.canvases[0]
        return self.canvases[int(rng.choice(len(self.canvases), p=self.canvas_p))]

    # a scene that respects the split: train never shows an unseen pair; val shows one when asked.
    # Without a canvas (spoken texts, which show no image) the scene is image_size square.
    def scene(self, rng, unseen: bool, n_objects=None, max_objects=None, canvas=None) -> S.Scene:
        sz = canvas if canvas is not None else (self.cfg.image_size, self.cfg.image_size)
        mo = min(self.cfg.max_objects, max_objects or self.cfg.max_objects)
        grid = {"snap": self.cfg.snap, "side_step": self.cfg.side_step}
        if n_objects is None and self.cfg.min_objects > 1:  # (with 1, sample_scene draws the count: same documents)
            n_objects = int(rng.integers(min(self.cfg.min_objects, mo), mo + 1))
        if unseen:
            forced = self.unseen_list[int(rng.integers(len(self.unseen_list)))]
            allowed = self.all_pairs if self.split == "val" else self.seen_pairs
            return S.sample_scene(rng, sz, n_objects, allowed, must_include=forced, max_objects=mo, **grid)
        return S.sample_scene(rng, sz, n_objects, self.seen_pairs, max_objects=mo, **grid)

    def image_scene(self, rng, unseen: bool, **kw) -> S.Scene:
        """A scene to be shown as an image: its canvas drawn first."""
        return self.scene(rng, unseen, canvas=self.canvas(rng), **kw)

    def utterance(self, rng, text: str) -> Utterance:
        c = self.cfg
        return Utterance(text, c.voices[int(rng.integers(len(c.voices)))],
                         int(rng.integers(c.speed_min, c.speed_max + 1)),
                         int(rng.integers(c.pitch_min, c.pitch_max + 1)))

    def caption(self, rng, scene: S.Scene) -> str:
        """A caption that describes an image (the answer of i2t): no word about its aspect."""
        leads = S.caption_lead_ins(self.cfg.phrase_order)
        return S.caption(scene, leads[int(rng.integers(len(leads)))], self.cfg.caption_order, self.cfg.phrase_order)

    def prompt_caption(self, rng, scene: S.Scene, omit: frozenset[str] = frozenset()) -> str:
        """A caption that asks for an image (t2i, a2i, story): says "wide" or "tall" unless square."""
        order = self.cfg.prompt_phrase_order or self.cfg.phrase_order
        leads = S.prompt_lead_ins(scene.aspect, order)
        return S.caption(scene, leads[int(rng.integers(len(leads)))], self.cfg.caption_order, order, omit)

    @staticmethod
    def scene_meta(scene: S.Scene) -> dict:
        """`objects`, and `canvas` for a non-square scene (square ones keep their old meta)."""
        meta: dict = {"objects": scene.to_dicts()}
        if scene.aspect != "square":
            meta["canvas"] = [scene.width, scene.height]
        return meta

    def doc(self, index: int) -> PlannedDoc:
        rng = np.random.default_rng([self.seed, SPLIT_ID[self.split], index])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        unseen = (self.split == "val" and kind != "prose" and self.unseen_list
                  and rng.random() < self.cfg.val_unseen_fraction)
        key = f"{self.split}-{index:08d}"
        segs, meta = getattr(self, "_" + kind)(rng, bool(unseen))
        meta["unseen"] = self._has_unseen(meta)
        if self.split == "train" and meta["unseen"]:  # the split contract, checked at the source
            raise AssertionError(f"train document {key} shows an unseen pair")
        return PlannedDoc(key, kind, segs, meta)

    def _has_unseen(self, meta: dict) -> bool:
        objs = [o for f in meta.get("frames", [meta.get("objects", [])]) for o in f]
        return any((o["colour"], o["shape"]) in self.cfg.unseen_pairs for o in objs)

    def _target(self, rng, scene: S.Scene) -> int:
        held = [i for i, o in enumerate(scene.objects) if o.combo in self.cfg.unseen_pairs]
        return held[0] if held else int(rng.integers(len(scene.objects)))

    def _queries(self, rng, scene: S.Scene) -> list[int]:
        """The objects a ground/refer document asks about: the target, then others in random order."""
        t = self._target(rng, scene)
        rest = [i for i in rng.permutation(len(scene.objects)).tolist() if i != t]
        return [t, *rest][: self.cfg.max_queries]

    # --- one method per kind: (segments, meta)
    def _t2i(self, rng, unseen):
        sc = self.image_scene(rng, unseen)
        omit = frozenset()
        if self.split == "train" and self.cfg.t2i_omit:
            omit = frozenset(w for w, share in sorted(self.cfg.t2i_omit.items()) if rng.random() < share)
        meta = {**self.scene_meta(sc), "prompt_segments": 1}
        if omit:
            meta["omitted"] = sorted(omit)
        return [{"text": self.prompt_caption(rng, sc, omit)}, {"image": sc}], meta

    def cue(self, rng, task: str, ref: str | None = None) -> str:
        return cue(task, int(rng.integers(len(CUES[task]))), ref=ref)

    def _i2t(self, rng, unseen):
        sc = self.image_scene(rng, unseen)
        return [{"image": sc}, {"text": self.cue(rng, "i2t")}, {"text": self.caption(rng, sc)}], \
            {**self.scene_meta(sc), "prompt_segments": 2}

    def _ground(self, rng, unseen):
        sc = self.image_scene(rng, unseen)
        queries = self._queries(rng, sc)
        # The first query comes before the image, so that every image position can attend to the
        # phrase it is asked about; with the image first, which object the phrase names was left to
        # the box's first token, and the model rarely learned it (docs/results.md, "The query before
        # the image"). Further queries about the same image follow its first answer.
        segs: list[dict] = []
        for i, t in enumerate(queries):
            o = sc.objects[t]
            segs += [{"text": self.cue(rng, "ground", ref=S.referring_expression(o))},
                     *([{"image": sc}] if i == 0 else []), {"box": list(o.box), "image_index": 0}]
        return segs, {**self.scene_meta(sc), "target": queries[0], "prompt_segments": 2}

    def _refer(self, rng, unseen):
        sc = self.image_scene(rng, unseen)
        queries = self._queries(rng, sc)
        segs: list[dict] = [{"image": sc}]
        for t in queries:
            o = sc.objects[t]
            segs += [{"text": self.cue(rng, "refer")}, {"box": list(o.box), "image_index": 0},
                     {"text": f"<ref>{S.referring_expression(o)}</ref>"}]
        return segs, {**self.scene_meta(sc), "target": queries[0], "prompt_segments": 3}

    def _spoken_text(self, rng, unseen) -> tuple[str, list[dict]]:
        """A caption of a fresh scene, or a short instruction about one object."""
        if rng.random() < self.cfg.instruction_fraction:
            sc = self.scene(rng, unseen, n_objects=1)
            o = sc.objects[0]
            tpl = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
            return tpl.format(colour=o.colour, shape=o.shape, size=o.size), \
                [{"colour": o.colour, "shape": o.shape, "size": o.size}]
        sc = self.scene(rng, unseen, max_objects=self.cfg.speech_max_objects)
        return self.caption(rng, sc), sc.to_dicts()

    def _asr(self, rng, unseen):
        text, objs = self._spoken_text(rng, unseen)
        u = self.utterance(rng, text)
        return [{"audio": u}, {"text": self.cue(rng, "asr")}, {"text": text}], \
            {"objects": objs, "transcript": text, "voice": u.voice, "speed": u.speed, "prompt_segments": 2}

    def _tts(self, rng, unseen):
        text, objs = self._spoken_text(rng, unseen)
        u = self.utterance(rng, text)
        return [{"text": self.cue(rng, "tts") + text}, {"audio": u}], \
            {"objects": objs, "transcript": text, "voice": u.voice, "speed": u.speed, "prompt_segments": 1}

    def _a2i(self, rng, unseen):
        sc = self.image_scene(rng, unseen, max_objects=self.cfg.speech_max_objects)
        text = self.prompt_caption(rng, sc)  # spoken: "a wide picture of ..." asks for a wide image
        u = self.utterance(rng, text)
        said = [{"text": text}] if self.cfg.a2i_answer == "transcript_image" else []
        return [{"audio": u}, {"text": self.cue(rng, "a2i")}, *said, {"image": sc}], \
            {**self.scene_meta(sc), "transcript": text, "voice": u.voice, "speed": u.speed,
             "prompt_segments": 2}

    def _story(self, rng, unseen):
        canvas = self.canvas(rng)
        sc = self.scene(rng, unseen, n_objects=int(rng.integers(self.cfg.min_objects, self.cfg.max_objects + 1)),
                        canvas=canvas)
        n_frames = int(rng.integers(2, self.cfg.story_max_images + 1))
        segs: list[dict] = [{"text": self.prompt_caption(rng, sc)}, {"image": sc}]
        meta = self.scene_meta(sc)  # every frame shares the first one's canvas
        frames, events = [meta.pop("objects")], []
        for _ in range(n_frames - 1):
            sc, sentence = self._story_step(rng, sc)
            segs += [{"text": sentence}, {"image": sc}]
            frames.append(sc.to_dicts())
            events.append(sentence)
        return segs, {"objects": frames[0], "frames": frames, "events": events, **meta, "prompt_segments": 1}

    def _story_step(self, rng, sc: S.Scene) -> tuple[S.Scene, str]:
        """One change: an object moves (usually), appears, or disappears."""
        r = rng.random()
        if r < 0.2 and len(sc.objects) < self.cfg.max_objects:
            allowed = self.all_pairs if self.split == "val" else self.seen_pairs
            choices = sorted(allowed - sc.combos())
            combo = choices[int(rng.integers(len(choices)))]
            word = S.SIZES[int(rng.integers(2))]
            side = S.pick_side(rng, word, min(sc.canvas), self.cfg.side_step)
            box = S.place_box(rng, side, sc.canvas, [o.box for o in sc.objects], snap=self.cfg.snap)
            if box is not None:
                o = S.SceneObject(combo[1], combo[0], word, box)
                where = S.where_phrase(box, sc.width, sc.height)
                return sc.with_objects(sc.objects + (o,)), f"then a {word} {o.colour} {o.shape} appears {where}"
        if r < 0.3 and len(sc.objects) > 1:
            i = int(rng.integers(len(sc.objects)))
            o = sc.objects[i]
            return sc.with_objects(sc.objects[:i] + sc.objects[i + 1:]), \
                f"then {S.referring_expression(o)} disappears"
        for _ in range(12):
            i = int(rng.integers(len(sc.objects)))
            d = ("left", "right", "up", "down")[int(rng.integers(4))]
            moved = S.move_object(rng, sc, i, d, snap=self.cfg.snap)
            if moved is not None:
                where = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[d]
                return moved, f"then {S.referring_expression(sc.objects[i])} moves {where}"
        return sc, "then nothing changes"

    def _prose(self, rng, unseen):
        paras = prose_paragraphs()
        i = int(rng.integers(len(paras)))
        text = paras[i]
        # a second consecutive paragraph when it fits, for longer-range text
        if i + 1 < len(paras) and len(text) + len(paras[i + 1]) + 2 <= self.cfg.prose_max_chars \
                and rng.random() < 0.5:
            text = text + "\n\n" + paras[i + 1]
        return [{"text": text}], {"prompt_segments": 0}


def plan_document(cfg: WorldConfig, split: str, seed: int, index: int, audio: bool = True) -> PlannedDoc:
    """Document `index` of a split (images as scenes, audio as utterances), without rendering."""
    return _Planner(cfg, split, seed, audio).doc(index)


# ----------------------------------------------------------------------------------- writing


def render_document(doc: PlannedDoc, waves: dict[int, np.ndarray], sample_rate: int) -> dict[str, bytes | str]:
    """One webdataset sample: `__key__`, `json` and the media `{n}.png|wav` (n counts media files)."""
    sample: dict[str, bytes | str] = {"__key__": doc.key}
    segments = []
    n = 0
    for j, seg in enumerate(doc.segments):
        if "image" in seg:
            name = f"{n}.png"
            sample[name] = encode_png(S.render_scene(seg["image"]))
            segments.append({"image": name})
            n += 1
        elif "audio" in seg:
            name = f"{n}.wav"
            sample[name] = encode_wav(waves[j], sample_rate)
            segments.append({"audio": name})
            n += 1
        else:
            segments.append(seg)
    record = {"segments": segments, "kind": doc.kind, "meta": doc.meta}
    sample["json"] = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return sample


class _ShardWriter:
    """`{split}-{k:05d}.tar`, `shard_size` documents each, through webdataset's `TarWriter`; a shard
    is written under a temporary name and renamed once complete (fixed owner, mode and times, so
    the same seed gives the same bytes)."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.tar = None
        self.count = 0
        self.shards: list[str] = []

    def _tmp(self) -> Path:
        return self.out / (self.shards[-1] + ".tmp")

    def add(self, sample: dict) -> None:
        from webdataset import TarWriter  # imports torch: loaded only once a shard is written

        if self.tar is None or self.count == self.shard_size:
            self._close()
            self.shards.append(f"{self.split}-{len(self.shards):05d}.tar")
            self.tar = TarWriter(str(self._tmp()), user="", group="", mode=0o644, mtime=0, encoder=False)
            self.count = 0
        self.tar.write(sample)
        self.count += 1

    def _close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self._tmp().replace(self.out / self.shards[-1])
            self.tar = None

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        """Leave no half-written shard behind."""
        if self.tar is not None:
            self.tar.close()
            self._tmp().unlink(missing_ok=True)
            self.tar = None


_WARNED_NO_ESPEAK = False


def generate_world(out: str | Path, split: str = "train", docs: int = 1000, seed: int = 0,
                   config: WorldConfig | str | None = None, overrides=(), require_audio: bool = False,
                   shard_size: int | None = None, progress: bool = True, audio: bool | None = None) -> dict:
    """Write `docs` documents of `split` into `out` as raw shards; returns the summary dict.

    `audio=None` uses espeak-ng when it is installed (saying once when it is not);
    `audio=False` writes no audio documents; `require_audio=True` fails without espeak-ng.
    """
    global _WARNED_NO_ESPEAK
    check_split(split)
    if docs < 1:
        raise UserError(f"--docs must be at least 1, not {docs}")
    if isinstance(config, WorldConfig):
        cfg = load_config(WorldConfig, data=to_dict(config), overrides=overrides) if overrides else config
    else:
        cfg = load_world_config(config, overrides)
    shard_size = cfg.shard_size if shard_size is None else shard_size
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}")
    have = espeak_available()
    if require_audio and not have:
        raise UserError("espeak-ng is not installed (apt-get install espeak-ng) and --require-audio was given")
    if audio is None:
        audio = have
        if not have and not _WARNED_NO_ESPEAK:
            print("anymodal world: espeak-ng not found; writing no audio documents "
                  "(apt-get install espeak-ng for speech)", file=sys.stderr)
            _WARNED_NO_ESPEAK = True
    elif audio and not have:
        raise UserError("espeak-ng is not installed; cannot write audio documents")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    for old in out.glob(f"{split}-*.tar*"):  # stale shards of an earlier, larger run
        old.unlink()

    planner = _Planner(cfg, split, seed, audio)
    writer = _ShardWriter(out, split, shard_size)
    counts = {k: 0 for k in KINDS}
    n_unseen = 0
    t0 = time.time()

    bar = tqdm(total=docs, unit="doc", desc=f"world {split}", disable=not progress or None, leave=False)
    pool = SpeechPool(cfg.speech_workers, cfg.sample_rate) if audio else None
    queue: list[tuple[list[PlannedDoc], bool]] = []  # planned batches waiting for their speech

    def flush_one():
        nonlocal n_unseen
        batch, has_speech = queue.pop(0)
        waves_iter = iter(pool.pop()) if has_speech else iter(())
        for d in batch:
            waves = {j: next(waves_iter) for j, s in enumerate(d.segments) if "audio" in s}
            writer.add(render_document(d, waves, cfg.sample_rate))
            counts[d.kind] += 1
            n_unseen += bool(d.meta["unseen"])
            bar.update(1)

    try:
        for start in range(0, docs, cfg.speech_batch):
            batch = [planner.doc(i) for i in range(start, min(docs, start + cfg.speech_batch))]
            utts = [s["audio"] for d in batch for s in d.segments if "audio" in s]
            if utts:
                pool.submit(utts)
            queue.append((batch, bool(utts)))
            while queue and (pool is None or pool.full() or not queue[0][1]):
                flush_one()
        while queue:
            flush_one()
        writer.close()
    except BaseException:
        if pool is not None:
            pool.terminate()
        writer.abort()
        raise
    finally:
        bar.close()
    if pool is not None:
        pool.close()
    seconds = time.time() - t0
    summary = {"split": split, "seed": seed, "docs": docs, "audio": bool(audio), "counts": counts,
               "unseen_docs": n_unseen, "unseen_pairs": list(cfg.unseen), "shards": writer.shards,
               "config": to_dict(cfg)}
    write_atomic(out / f"{split}.json", json.dumps(summary, indent=1) + "\n")
    log.info("wrote %d %s documents to %s in %.1f s", docs, split, out, seconds)
    return {**summary, "seconds": seconds}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")

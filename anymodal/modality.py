"""The modalities of the token stream, named once for every package.

`Modality` ids are what token shards store per token (`.mod` files) and what the loss splits by;
`MODALITY_NAMES[i]` is the name of id i. Box coordinates (`loc`) are a modality of the stream but
have no tokenizer of their own: they are text-tokenizer pieces, so `TOKENIZER_KINDS` lists three.
"""

from __future__ import annotations

from enum import IntEnum


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    AUDIO = 2
    LOC = 3


MODALITY_NAMES: tuple[str, ...] = tuple(m.name.lower() for m in Modality)  # ("text", "image", "audio", "loc")
TOKENIZER_KINDS: tuple[str, ...] = ("text", "image", "audio")  # the frozen tokenizers a run uses

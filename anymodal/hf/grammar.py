"""The stream grammar as a `transformers` logits processor, so `generate` emits what decodes.

`StreamGrammar` runs `anymodal.sample.constraints.Constrainer` (the state machine `anymodal sample`
uses) beside a Hugging Face `generate` call: it reads the prompt once, then follows each generated
token and masks what may not come next (an image's two size tokens within the image budget, then
h rows of exactly w codes each closed by `<eor>`, then `<eoi>`; a square space: exactly h × w codes
and `<eoi>`; whole audio frames; four ordered `<loc_*>` per box). A prompt ending in
`<boi> <size_h> <size_w>` fixes the grid. With greedy decoding on both sides, `generate` with this
processor gives the ids `anymodal sample --temperature 0 --cfg 1` gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..sample.constraints import Constrainer
from ..tokenizers.token_space import TokenSpace


class StreamGrammar:
    """`logits_processor=[StreamGrammar(space)]` for `model.generate` (one generate call at a time).

    max_new_tokens: the same budget as generate's; near its end no span is opened that cannot
    close (as `anymodal sample` does). None: no room checks. max_image_tokens: the most codes of an
    image whose grid the model chooses (the image tokenizer's `max_tokens`; `from_folder` reads it
    from the export; default the space's square grid).
    """

    def __init__(self, space: TokenSpace, max_new_tokens: int | None = None, max_audio_frames: int | None = None,
                 max_image_tokens: int | None = None):
        self.space = space
        self.max_new_tokens = max_new_tokens
        self.max_audio_frames = max_audio_frames
        self.max_image_tokens = max_image_tokens
        self._con: Constrainer | None = None
        self._state = None
        self._seen = 0
        self._prompt_len = 0

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs) -> StreamGrammar:
        """From an exported folder: its token_space.json, and the image budget its config.json holds."""
        config = Path(path) / "config.json"
        block = json.loads(config.read_text()).get("anymodal", {}) if config.is_file() else {}
        if block.get("image_max_tokens") is not None:
            kwargs.setdefault("max_image_tokens", int(block["image_max_tokens"]))
        return cls(TokenSpace.load(path), **kwargs)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, n = input_ids.shape
        if self._con is None or self._con.device != scores.device:
            self._con = Constrainer(self.space, self.max_audio_frames, device=scores.device,
                                    max_image_tokens=self.max_image_tokens)
            self._state = None
        if self._state is None or n <= self._seen or self._state.mode.shape[0] != batch:
            # a new generate call: read its prompts (left padding is text and changes nothing)
            self._state = self._con.from_prompts(input_ids.tolist())
            self._prompt_len = n
        else:
            for t in range(self._seen, n):
                self._con.advance(self._state, input_ids[:, t].to(scores.device))
        self._seen = n
        remaining = None
        if self.max_new_tokens is not None:
            left = self.max_new_tokens - (n - self._prompt_len)
            remaining = torch.full((batch,), left, dtype=torch.long, device=scores.device)
        return self._con.apply(scores, self._state, remaining)

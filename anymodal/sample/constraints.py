"""Constrained decoding: one state machine over the TokenSpace, vectorized over the batch.

Every row of a batch is in one of five modes:

    TEXT   any text token, `</s>`, `<ref>`/`</ref>`, or a span opener `<boi>` `<boa>` `<box>`
    IMAGE  exactly h*w image codes, then a forced `<eoi>`
    AUDIO  frame-major codec codes: position l of a frame allows only level-l codes; `<eoa>` only at a
           frame boundary (after >= 1 frame), forced once `max_audio_frames` frames are out
    BOX    four `<loc_*>` (x1 < x2, y1 < y2 enforced) then a forced `</box>`
    DONE   the row finished; only `<pad>` (the engine ignores it)

The allowed set of every (mode, position) is one row of a small precomputed table of vocab masks,
built from the TokenSpace ranges (never from piece names); a step is a handful of tensor ops:
pick a table row per batch row, gather, fill the rest of the logits with -inf. Because the model
can only sample allowed ids, every generated image, clip and box decodes through the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenizers.token_space import TokenSpace

TEXT, IMAGE, AUDIO, BOX, DONE = 0, 1, 2, 3, 4
MODE_NAMES = ("text", "image", "audio", "loc", "done")
NEG_INF = float("-inf")


@dataclass
class ConstraintState:
    """Per-row decoding state (all LongTensor [B])."""

    mode: torch.Tensor  # TEXT/IMAGE/AUDIO/BOX/DONE
    pos: torch.Tensor  # tokens emitted inside the current span
    box_lo: torch.Tensor  # [B, 2] first two loc bins of the current box (x1, y1), for x2 > x1, y2 > y1

    def clone(self) -> ConstraintState:
        return ConstraintState(self.mode.clone(), self.pos.clone(), self.box_lo.clone())


class Constrainer:
    """Masks and transitions of the stream grammar for one TokenSpace."""

    def __init__(self, space: TokenSpace, max_audio_frames: int | None = None, device="cpu"):
        self.space = space
        self.device = torch.device(device)
        self.hw = space.image_tokens
        self.n_q = max(1, space.audio_n_q)
        self.has_audio = space.audio_n_q > 0 and space.audio_codebook_size > 0
        self.has_image = self.hw > 0 and space.image_codebook_size > 0
        # An audio span stops at this many frames: ~20 s by default.
        if max_audio_frames is None:
            max_audio_frames = max(1, int(round(20 * space.audio_frame_rate))) if self.has_audio else 1
        self.max_audio_frames = int(max_audio_frames)
        V = space.vocab_size

        def only(*ids: int) -> torch.Tensor:
            m = torch.zeros(V, dtype=torch.bool)
            m[list(ids)] = True
            return m

        def span(lo: int, hi: int) -> torch.Tensor:
            m = torch.zeros(V, dtype=torch.bool)
            m[lo:hi] = True
            return m

        # TEXT: the text range less the loc pieces, less tokens that are never free text.
        text = span(0, space.text_size)
        text[slice(*space.loc_range())] = False
        for i in (space.unk, space.bos, space.pad, space.eoi, space.eoa, space.ebox):
            text[i] = False
        if not self.has_image:
            text[space.boi] = False
        if not self.has_audio:
            text[space.boa] = False
        rows = [text]  # row 0
        self.R_TEXT = 0
        self.R_IMAGE = len(rows)
        rows.append(span(*space.image_range()))
        self.R_EOI = len(rows)
        rows.append(only(space.eoi))
        self.R_AUDIO = len(rows)  # n_q rows, one per level
        for lvl in range(self.n_q):
            rows.append(span(*space.audio_range(lvl)) if self.has_audio else only(space.eoa))
        self.R_AUDIO0_OR_EOA = len(rows)
        rows.append(rows[self.R_AUDIO] | only(space.eoa))
        self.R_EOA = len(rows)
        rows.append(only(space.eoa))
        self.R_LOC = len(rows)
        rows.append(span(*space.loc_range()))
        self.R_EBOX = len(rows)
        rows.append(only(space.ebox))
        self.R_PAD = len(rows)
        rows.append(only(space.pad))
        self.table = torch.stack(rows).to(self.device)  # [R, V]
        self.loc_lo, self.loc_hi = space.loc_range()
        self.loc_bins = space.loc_bins
        self._bins = torch.arange(space.loc_bins, device=self.device)  # [B_loc]
        # Token -> kind lookups for the transition function.
        self.is_image_code = span(*space.image_range()).to(self.device)
        self.is_audio_code = span(*space.audio_range()).to(self.device)
        self.is_loc = span(*space.loc_range()).to(self.device)

    # ---- state -------------------------------------------------------------------------------
    def initial(self, batch: int) -> ConstraintState:
        z = torch.zeros(batch, dtype=torch.long, device=self.device)
        return ConstraintState(z.clone(), z.clone(), torch.zeros(batch, 2, dtype=torch.long, device=self.device))

    def from_prompts(self, prompts: list[list[int]]) -> ConstraintState:
        """The state after reading each prompt (a prompt may end inside a span, e.g. with `<boi>`)."""
        state = self.initial(len(prompts))
        width = max((len(p) for p in prompts), default=0)
        for t in range(width):
            # Rows whose prompt is shorter are fed a no-op; prompts are short, so a loop is fine.
            tok = torch.tensor([p[t] if t < len(p) else -1 for p in prompts], device=self.device)
            active = tok >= 0
            self.advance(state, tok.clamp_min(0), active=active, strict=False)
        return state

    # ---- masks -------------------------------------------------------------------------------
    def row_index(self, state: ConstraintState, remaining: torch.Tensor | None = None) -> torch.Tensor:
        """Which table row applies to each batch row: LongTensor [B]."""
        mode, pos = state.mode, state.pos
        idx = torch.full_like(mode, self.R_TEXT)
        img = torch.where(pos < self.hw, self.R_IMAGE, self.R_EOI)
        level = pos % self.n_q
        frames = pos // self.n_q
        aud = torch.where(level > 0, self.R_AUDIO + level, self.R_AUDIO)
        aud = torch.where((level == 0) & (frames >= 1), self.R_AUDIO0_OR_EOA, aud)
        must_close = frames >= self.max_audio_frames
        if remaining is not None:  # no room for another frame and the <eoa>
            must_close = must_close | (remaining < self.n_q + 1)
        aud = torch.where((level == 0) & (frames >= 1) & must_close, self.R_EOA, aud)
        box = torch.where(pos < 4, self.R_LOC, self.R_EBOX)
        idx = torch.where(mode == IMAGE, img, idx)
        idx = torch.where(mode == AUDIO, aud, idx)
        idx = torch.where(mode == BOX, box, idx)
        idx = torch.where(mode == DONE, self.R_PAD, idx)
        return idx

    def allowed(self, state: ConstraintState, remaining: torch.Tensor | None = None) -> torch.Tensor:
        """BoolTensor [B, V]: the ids each row may emit next.

        remaining [B] (optional): tokens each row may still generate, this one included. A span is
        only opened when it fits (an image needs h*w + 2 tokens, a box 6, audio one frame + 2), and
        audio is closed while there is room for `<eoa>`, so a length cut never leaves a broken span.
        """
        allowed = self.table[self.row_index(state, remaining)]  # [B, V]
        if remaining is not None:
            sp = self.space
            allowed[:, sp.boi] &= remaining >= self.hw + 2
            allowed[:, sp.box] &= remaining >= 6
            allowed[:, sp.boa] &= remaining >= self.n_q + 2
        in_box = (state.mode == BOX) & (state.pos < 4)
        if bool(in_box.any()):
            # x1, y1 leave room for a larger second corner; x2 > x1 and y2 > y1.
            second = state.pos >= 2  # [B]
            lo = torch.where(second, state.box_lo.gather(1, (state.pos - 2).clamp(0, 1)[:, None])[:, 0], -1)
            hi = torch.where(second, self.loc_bins - 1, self.loc_bins - 2)
            ok = (self._bins[None] > lo[:, None]) & (self._bins[None] <= hi[:, None])  # [B, bins]
            allowed[:, self.loc_lo : self.loc_hi] &= ok | ~in_box[:, None]
        return allowed

    def apply(self, logits: torch.Tensor, state: ConstraintState, remaining: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] with every disallowed id at -inf (in place)."""
        return logits.masked_fill_(~self.allowed(state, remaining), NEG_INF)

    # ---- transitions -------------------------------------------------------------------------
    def advance(self, state: ConstraintState, tok: torch.Tensor, active: torch.Tensor | None = None,
                strict: bool = True) -> None:
        """Move every row past token `tok` [B] (rows where `active` is False stay put).

        With strict=False (reading a prompt) tokens that break the grammar are absorbed sensibly:
        a span that is interrupted just ends.
        """
        sp = self.space
        mode, pos = state.mode, state.pos
        if active is None:
            active = torch.ones_like(mode, dtype=torch.bool)
        in_text = mode == TEXT
        opens_img = in_text & (tok == sp.boi)
        opens_aud = in_text & (tok == sp.boa)
        opens_box = in_text & (tok == sp.box)
        closes = ((mode == IMAGE) & (tok == sp.eoi)) | ((mode == AUDIO) & (tok == sp.eoa)) \
            | ((mode == BOX) & (tok == sp.ebox))
        inside = ((mode == IMAGE) & self.is_image_code[tok]) | ((mode == AUDIO) & self.is_audio_code[tok]) \
            | ((mode == BOX) & self.is_loc[tok])
        # Box corners are remembered for the ordering constraint.
        is_lo_corner = (mode == BOX) & inside & (pos < 2)
        if bool(is_lo_corner.any()):
            col = pos.clamp(0, 1)
            val = (tok - self.loc_lo).clamp_min(0)
            upd = state.box_lo.gather(1, col[:, None])[:, 0]
            upd = torch.where(is_lo_corner & active, val, upd)
            state.box_lo.scatter_(1, col[:, None], upd[:, None])
        new_mode = mode.clone()
        new_mode = torch.where(opens_img, IMAGE, new_mode)
        new_mode = torch.where(opens_aud, AUDIO, new_mode)
        new_mode = torch.where(opens_box, BOX, new_mode)
        new_mode = torch.where(closes, TEXT, new_mode)
        new_pos = torch.where(inside, pos + 1, torch.zeros_like(pos))
        if not strict:
            # A stray token inside a span (only possible in a hand-written prompt) ends the span.
            stray = (mode != TEXT) & (mode != DONE) & ~inside & ~closes
            new_mode = torch.where(stray, TEXT, new_mode)
        eos = (tok == sp.eos) & (mode == TEXT) & strict
        new_mode = torch.where(eos, DONE, new_mode)
        state.mode.copy_(torch.where(active, new_mode, mode))
        state.pos.copy_(torch.where(active, new_pos, pos))

    def finish(self, state: ConstraintState, rows: torch.Tensor) -> None:
        """Mark rows (BoolTensor [B]) as done: they only emit `<pad>` from now on."""
        state.mode.masked_fill_(rows, DONE)
        state.pos.masked_fill_(rows, 0)

    def force_first(self, tokens: list[int | None]) -> torch.Tensor:
        """LongTensor [B] of tokens forced as the first generated id (-1 where free)."""
        return torch.tensor([-1 if t is None else int(t) for t in tokens], dtype=torch.long, device=self.device)


def mode_modality(mode: torch.Tensor) -> torch.Tensor:
    """Which sampling-parameter set (text=0, image=1, audio=2, loc=3) applies in each mode."""
    return mode.clamp(max=BOX)

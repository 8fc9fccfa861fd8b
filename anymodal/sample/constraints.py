"""Constrained decoding: one state machine over the TokenSpace, vectorized over the batch.

Every row of a batch is in one of five modes:

    TEXT   any text token, `</s>`, `<ref>`/`</ref>`, or a span opener `<boi>` `<boa>` `<box>`
    IMAGE  version 2 (any aspect): `<size_h>` then `<size_w>` (the model's choice: sides up to
           `image_max_side` and h*w up to `max_image_tokens`), then h rows of exactly w image codes,
           each closed by a forced `<eor>`, then a forced `<eoi>`;
           version 1 (square): exactly h*w codes of the space's grid, then a forced `<eoi>`
    AUDIO  frame-major codec codes: position l of a frame allows only level-l codes; `<eoa>` only at a
           frame boundary (after >= 1 frame), forced once `max_audio_frames` frames are out
    BOX    four `<loc_*>` (x1 < x2, y1 < y2 enforced) then a forced `</box>`
    DONE   the row finished; only `<pad>` (the engine ignores it)

The allowed set of every (mode, position) is one row of a small precomputed table of vocab masks,
built from the TokenSpace ranges (never from piece names); a step is a handful of tensor ops:
pick a table row per batch row, gather, fill the rest of the logits with -inf. Inside a version-2
image the table row follows from the row's own grid (h, w in the state, read from its size tokens),
so rows of one batch can draw images of different shapes. Because the model can only sample
allowed ids, every generated image, clip and box decodes through the stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..modality import MODALITY_NAMES, Modality
from ..tokenizers.token_space import TokenSpace

# A row generating a modality is in the mode of that id (BOX: loc), so a mode picks the sampling
# parameters of its modality; DONE comes after them.
TEXT, IMAGE, AUDIO, BOX = int(Modality.TEXT), int(Modality.IMAGE), int(Modality.AUDIO), int(Modality.LOC)
DONE = len(Modality)
MODE_NAMES = (*MODALITY_NAMES, "done")
NEG_INF = float("-inf")


@dataclass
class ConstraintState:
    """Per-row decoding state (all LongTensor)."""

    mode: torch.Tensor  # [B] TEXT/IMAGE/AUDIO/BOX/DONE
    pos: torch.Tensor  # [B] tokens emitted inside the current span (an image's size tokens included)
    box_lo: torch.Tensor  # [B, 2] first two loc bins of the current box (x1, y1), for x2 > x1, y2 > y1
    grid: torch.Tensor  # [B, 2] (h, w) of the current image, from its size tokens (version 2)

    def clone(self) -> ConstraintState:
        return ConstraintState(self.mode.clone(), self.pos.clone(), self.box_lo.clone(), self.grid.clone())


class Constrainer:
    """Masks and transitions of the stream grammar for one TokenSpace.

    max_image_tokens: the most codes an image whose size the model chooses may have (the image
    tokenizer's `max_tokens`; default the space's square grid). A grid a prompt states is kept
    whatever its area: it is the caller's choice."""

    def __init__(self, space: TokenSpace, max_audio_frames: int | None = None, device="cpu",
                 max_image_tokens: int | None = None):
        self.space = space
        self.device = torch.device(device)
        self.hw = space.image_tokens
        self.n_q = max(1, space.audio_n_q)
        self.has_audio = space.audio_n_q > 0 and space.audio_codebook_size > 0
        self.has_image = self.hw > 0 and space.image_codebook_size > 0
        self.any_aspect = self.has_image and space.any_aspect
        self.max_image_tokens = int(max_image_tokens if max_image_tokens is not None else self.hw)
        if self.any_aspect and self.max_image_tokens < 1:
            raise ValueError(f"max_image_tokens must be >= 1, got {max_image_tokens}")
        self.max_side = space.image_max_side
        # Tokens from <boi> to <eoi> of the longest image the model may choose: an image is opened
        # only when it fits, so the budget never shapes an image the model opened itself.
        self.image_open = space.image_max_span(self.max_image_tokens) if self.any_aspect else self.hw + 2
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
        self.R_SIZE = self.R_EOR = -1  # version 2 only
        if self.any_aspect:
            self.R_SIZE = len(rows)
            rows.append(span(*space.size_range()))
            self.R_EOR = len(rows)
            rows.append(only(space.eor))
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
        self.size_lo, self.size_hi = space.size_range() if self.any_aspect else (0, 0)
        self._sides = torch.arange(1, self.max_side + 1, device=self.device)  # [S]: the side of each size token
        # Token -> kind lookups for the transition function.
        self._build_step_tables()

    # ---- state -------------------------------------------------------------------------------
    def initial(self, batch: int) -> ConstraintState:
        z = torch.zeros(batch, dtype=torch.long, device=self.device)
        pair = torch.zeros(batch, 2, dtype=torch.long, device=self.device)
        return ConstraintState(z.clone(), z.clone(), pair.clone(), pair.clone())

    def from_prompts(self, prompts: list[list[int]]) -> ConstraintState:
        """The state after reading each prompt (a prompt may end inside a span, e.g. with `<boi>`, or,
        version 2, with `<boi> <size_h>` or `<boi> <size_h> <size_w>`, which fixes the grid)."""
        state = self.initial(len(prompts))
        width = max((len(p) for p in prompts), default=0)
        for t in range(width):
            # Rows whose prompt is shorter are fed a no-op; prompts are short, so a loop is fine.
            tok = torch.tensor([p[t] if t < len(p) else -1 for p in prompts], device=self.device)
            active = tok >= 0
            self.advance(state, tok.clamp_min(0), active=active, strict=False)
        return state

    # ---- masks -------------------------------------------------------------------------------
    def _build_step_tables(self) -> None:
        """(mode, pos) -> mask row, and (mode, token class) -> next mode / whether pos counts on."""
        sp, hw, nq = self.space, self.hw, self.n_q
        image_pos = 2 if self.any_aspect else hw  # version 2: past its sizes an image's row comes from its grid
        P = max(image_pos, self.max_audio_frames * nq, 4) + 2  # positions past P-1 behave like P-1
        self.max_pos = P - 1
        row = torch.full((len(MODE_NAMES), P), self.R_TEXT, dtype=torch.long)
        pos = torch.arange(P)
        if self.any_aspect:
            row[IMAGE] = torch.where(pos < 2, self.R_SIZE, self.R_IMAGE)
        else:
            row[IMAGE] = torch.where(pos < hw, self.R_IMAGE, self.R_EOI)
        level, frames = pos % nq, pos // nq
        aud = torch.where(level > 0, self.R_AUDIO + level, self.R_AUDIO)
        aud = torch.where((level == 0) & (frames >= 1), self.R_AUDIO0_OR_EOA, aud)
        aud = torch.where((level == 0) & (frames >= self.max_audio_frames), self.R_EOA, aud)
        row[AUDIO] = aud
        row[BOX] = torch.where(pos < 4, self.R_LOC, self.R_EBOX)
        row[DONE] = self.R_PAD
        self.row_of = row.to(self.device)  # [modes, P]
        # Token classes.
        C_OTHER, C_BOI, C_BOA, C_BOX, C_EOI, C_EOA, C_EBOX, C_IMG, C_AUD, C_LOC, C_EOS, C_SIZE, C_EOR = range(13)
        cls = torch.full((sp.vocab_size,), C_OTHER, dtype=torch.long)
        cls[slice(*sp.image_range())] = C_IMG
        cls[slice(*sp.audio_range())] = C_AUD
        cls[slice(*sp.loc_range())] = C_LOC
        if self.any_aspect:
            cls[slice(*sp.size_range())] = C_SIZE
            cls[sp.eor] = C_EOR
        for i, c in ((sp.boi, C_BOI), (sp.boa, C_BOA), (sp.box, C_BOX), (sp.eoi, C_EOI), (sp.eoa, C_EOA),
                     (sp.ebox, C_EBOX), (sp.eos, C_EOS)):
            cls[i] = c
        self.class_of = cls.to(self.device)
        self.C_LOC, self.C_SIZE = C_LOC, C_SIZE
        # A stray token inside a span (only possible in a hand-written prompt: generated tokens obey
        # the masks) ends the span.
        nxt = torch.full((len(MODE_NAMES), 13), TEXT, dtype=torch.long)
        nxt[TEXT, C_BOI], nxt[TEXT, C_BOA], nxt[TEXT, C_BOX] = IMAGE, AUDIO, BOX
        nxt[IMAGE, C_IMG], nxt[AUDIO, C_AUD], nxt[BOX, C_LOC] = IMAGE, AUDIO, BOX
        inc = torch.zeros((len(MODE_NAMES), 13), dtype=torch.long)
        inc[IMAGE, C_IMG] = inc[AUDIO, C_AUD] = inc[BOX, C_LOC] = 1
        if self.any_aspect:
            nxt[IMAGE, C_SIZE] = nxt[IMAGE, C_EOR] = IMAGE
            inc[IMAGE, C_SIZE] = inc[IMAGE, C_EOR] = 1
        nxt[DONE] = DONE
        self.next_prompt = nxt.to(self.device)  # reading a prompt: </s> is just text
        nxt = nxt.clone()
        nxt[TEXT, C_EOS] = DONE
        self.next_gen = nxt.to(self.device)
        self.pos_inc = inc.to(self.device)
        self.tight = max(self.image_open, nq + 2, 6)  # below this many tokens left, room checks apply
        # Per mask row, the smallest id range [lo, hi) holding its allowed ids: the decoder need not
        # compute logits outside it (box order and size limits only remove ids; room checks are
        # handled in vocab_span).
        self.row_span = []
        for r in range(self.table.shape[0]):
            ids = self.table[r].nonzero()[:, 0]
            self.row_span.append((int(ids.min()), int(ids.max()) + 1))

    def vocab_span(self, rows: torch.Tensor, remaining: int) -> tuple[int, int]:
        """One id range [lo, hi) covering everything rows in these states may emit next: rows [B] are
        their `row_index` (without `remaining`), `remaining` the fewest tokens any row may still
        generate. Near the end of a budget a room check can swap a row's mask (e.g. force `<eoa>`),
        so the whole vocabulary is kept."""
        if remaining < self.tight:
            return 0, self.space.vocab_size
        spans = {self.row_span[r] for r in rows.tolist()}
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def _image_rows(self, state: ConstraintState) -> torch.Tensor:
        """Version 2: the table row of each batch row's next token were it inside an image, from its
        position and grid: a size, a code, the row's `<eor>`, or `<eoi>` after h rows. LongTensor [B]."""
        h, w = state.grid.unbind(1)
        k = state.pos - 2  # tokens since the size tokens
        stride = w + 1  # a row: w codes and its <eor>
        idx = torch.where(k.remainder(stride) == w, self.R_EOR, self.R_IMAGE)
        idx = torch.where(k >= h * stride, self.R_EOI, idx)
        return torch.where(k < 0, self.R_SIZE, idx)

    def row_index(self, state: ConstraintState, remaining: torch.Tensor | None = None,
                  modes: Sequence[int] | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Which table row applies to each batch row: LongTensor [B]. rows: this state's row index
        without `remaining`, when the caller has it already (it is then not recomputed)."""
        if rows is not None:
            idx = rows
        elif self.any_aspect and modes is not None and len(modes) and all(m == IMAGE for m in modes):
            idx = self._image_rows(state)  # every row draws an image (the common batch of t2i)
        else:
            idx = self.row_of[state.mode, state.pos.clamp(max=self.max_pos)]  # [B]
            if self.any_aspect and (modes is None or IMAGE in modes):
                idx = torch.where(state.mode == IMAGE, self._image_rows(state), idx)
        if remaining is not None:
            # No room for another frame and the <eoa>: close the clip now (after >= 1 frame).
            pos = state.pos
            close = (state.mode == AUDIO) & (pos % self.n_q == 0) & (pos > 0) & (remaining < self.n_q + 1)
            idx = torch.where(close, self.R_EOA, idx)
        return idx

    def allowed(self, state: ConstraintState, remaining: torch.Tensor | None = None,
                modes: Sequence[int] | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """BoolTensor [B, V]: the ids each row may emit next.

        remaining [B] (optional): tokens each row may still generate, this one included. A span is
        only opened when it fits (an image needs the span of the largest grid the model may choose,
        a box 6, audio one frame + 2); the size of an image already open (a prompt ending in `<boi>`)
        is limited to what fits; audio is closed while there is room for `<eoa>`; so a length cut
        never leaves a broken span. modes: the rows' modes as the caller keeps them (a list); checks
        no row's mode needs are skipped (None: all are done). rows: as in `row_index`.
        """
        # Room checks matter only near the end of a row's budget (one sync to find out).
        if remaining is not None and int(remaining.min()) >= self.tight:
            remaining = None
        allowed = self.table[self.row_index(state, remaining, modes, rows)]  # [B, V]
        if remaining is not None:
            sp = self.space
            allowed[:, sp.boi] &= remaining >= self.image_open
            allowed[:, sp.box] &= remaining >= 6
            allowed[:, sp.boa] &= remaining >= self.n_q + 2
        if self.any_aspect and (modes is None or IMAGE in modes):
            # no sync to find the rows at a size position: only they have size ids allowed at all
            self._limit_sizes(allowed, state, remaining)
        in_box = (state.mode == BOX) & (state.pos < 4) if modes is None or BOX in modes else None
        if in_box is not None and bool(in_box.any()):  # (one sync; boxes are rare)
            # x1, y1 leave room for a larger second corner; x2 > x1 and y2 > y1.
            second = state.pos >= 2  # [B]
            lo = torch.where(second, state.box_lo.gather(1, (state.pos - 2).clamp(0, 1)[:, None])[:, 0], -1)
            hi = torch.where(second, self.loc_bins - 1, self.loc_bins - 2)
            ok = (self._bins[None] > lo[:, None]) & (self._bins[None] <= hi[:, None])  # [B, bins]
            allowed[:, self.loc_lo : self.loc_hi] &= ok | ~in_box[:, None]
        return allowed

    def _limit_sizes(self, allowed: torch.Tensor, state: ConstraintState, remaining: torch.Tensor | None) -> None:
        """The size tokens a row may choose (in place on allowed [B, V]): h up to the side limit and the
        token budget, then w with h*w within the budget (at least 1: a prompt may state a tall h);
        with `remaining`, only grids whose rest of the image fits. Only rows at a size position have
        size ids allowed at all, so the limit is applied to every row."""
        h = state.grid[:, 0].clamp_min(1)  # [B]: the stated h when choosing w
        first = state.pos == 0
        limit = torch.where(first, min(self.max_side, self.max_image_tokens),
                            (self.max_image_tokens // h).clamp(1, self.max_side))
        if remaining is not None:
            # after <size_h>: <size_w>, h rows of w codes and <eor>, <eoi>; after <size_w>: the rows and <eoi>
            room = torch.where(first, (remaining - 3) // 2, (remaining - 2) // h - 1)
            limit = torch.minimum(limit, room).clamp_min(1)  # nothing fits: the smallest, cut by the budget
        allowed[:, self.size_lo: self.size_hi] &= self._sides[None] <= limit[:, None]

    def fits(self, state: ConstraintState, tok: torch.Tensor) -> torch.Tensor:
        """BoolTensor [B]: whether each row's `tok` [B] fits the stream's structure next, without the
        limits on the model's own choices (room checks, the grid budget, box corner order): what a
        prompt or a forced id may hold."""
        return self.table[self.row_index(state)].gather(1, tok[:, None])[:, 0]

    def apply(self, logits: torch.Tensor, state: ConstraintState, remaining: torch.Tensor | None = None,
              modes: Sequence[int] | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] with every disallowed id at -inf (in place)."""
        return logits.masked_fill_(~self.allowed(state, remaining, modes, rows), NEG_INF)

    # ---- transitions -------------------------------------------------------------------------
    def advance(self, state: ConstraintState, tok: torch.Tensor, active: torch.Tensor | None = None,
                strict: bool = True, modes: Sequence[int] | None = None) -> None:
        """Move every row past token `tok` [B] (rows where `active` is False stay put).

        strict=False reads a prompt: `</s>` does not finish it, and a token that breaks a span
        (possible only in hand-written prompts) just ends that span. modes: the rows' modes before
        `tok` as the caller keeps them; the image-size and box-corner bookkeeping is skipped when no
        row is in that mode (None: never skipped).
        """
        mode, pos = state.mode, state.pos
        cls = self.class_of[tok]  # [B]
        new_mode = (self.next_gen if strict else self.next_prompt)[mode, cls]
        new_pos = (pos + 1) * self.pos_inc[mode, cls]
        images = self.any_aspect and (modes is None or IMAGE in modes)
        if images and not strict:
            # In a version-2 image a token belongs to one position (size, code, row end): one out of
            # place ends the image, as any token that breaks a span does.
            broken = (mode == IMAGE) & ~self.fits(state, tok)
            new_mode = torch.where(broken, TEXT, new_mode)
            new_pos = torch.where(broken, 0, new_pos)
        if images:
            # The size tokens, h then w, are the image's grid. A stray one (text, or out of place in a
            # prompt's image) may write it too: an image reads its grid only after its own sizes.
            sized = cls == self.C_SIZE
            if active is not None:
                sized &= active
            self._remember(state.grid, pos, sized, tok - self.size_lo + 1)  # rows without a size keep theirs
        # Box corners x1, y1 are remembered for the ordering constraint.
        lo_corner = (mode == BOX) & (cls == self.C_LOC) & (pos < 2) if modes is None or BOX in modes else None
        if lo_corner is not None and active is not None:
            lo_corner &= active
        if lo_corner is not None and bool(lo_corner.any()):
            self._remember(state.box_lo, pos, lo_corner, tok - self.loc_lo)
        if active is not None:
            new_mode = torch.where(active, new_mode, mode)
            new_pos = torch.where(active, new_pos, pos)
        state.mode.copy_(new_mode)
        state.pos.copy_(new_pos)

    @staticmethod
    def _remember(pair: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> None:
        """pair[b, pos[b]] = value[b] (pos 0 or 1) where rows[b] (in place on pair [B, 2])."""
        col = pos.clamp(0, 1)[:, None]
        old = pair.gather(1, col)[:, 0]
        pair.scatter_(1, col, torch.where(rows, value, old)[:, None])

    def finish(self, state: ConstraintState, rows: torch.Tensor) -> None:
        """Mark rows (BoolTensor [B]) as done: they only emit `<pad>` from now on."""
        state.mode.masked_fill_(rows, DONE)
        state.pos.masked_fill_(rows, 0)

"""The decoding engine: batched prefill + decode on a KV cache, constrained, with CFG.

The engine knows only token ids. A batch of `Request`s is left-padded into one cache; each step
runs the model on one token per row, mixes in the classifier-free-guidance branch, masks the
logits with the stream grammar (`Constrainer`), samples with each row's own parameters and
generator, and advances the grammar.

Classifier-free guidance (image and audio spans). A request with `cfg_scale != 1` gets a second,
*unconditional* row in the same batch, with its own cache rows. That row holds only `<s>`; while
its partner writes text it is fed `<pad>` into slots marked invalid (so it still sees only `<s>`).
When the partner opens an image/audio span, the unconditional row is fed the same span tokens as
valid slots, so it sees `<s> <boi> c_1 … c_k`: the span opened without the prompt. In a version-2
image that includes the size tokens the partner chose (or its prompt stated) and every `<eor>`, so
both rows follow one grid. Inside the span the partner samples from `c + (s − 1)·(c − u)`
(= `u + s·(c − u)`, written so that s = 1 gives `c` bit for bit); the size tokens too, so guidance
also pulls the grid towards the prompt's. When the span closes, the span slots are invalidated
again and the row's position goes back to 1, ready for the next span.

Per step the Python work is a fixed handful of tensor ops on [B, V] (no per-token Python loops
over the vocabulary, no mask rebuilding): the cache is preallocated, masks come from a table.
On a CPU the step itself runs in the native decode kernel where it applies
(`anymodal.kernels.decode`), else it is `model.decode`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from ..kernels.decode import NativeDecoder
from ..model.kv_cache import KVCache
from ..tokenizers.token_space import TokenSpace
from .constraints import AUDIO, BOX, DONE, IMAGE, TEXT, Constrainer, ConstraintState
from .sampling import ModalitySampling, make_generators, sample


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance `u + s·(c − u)`, computed as `c + (s − 1)·(c − u)` so that s = 1
    returns `cond` bit for bit. Ids outside the decoded vocabulary span are -inf in both and mix to
    NaN; the grammar mask, applied right after, sets exactly those (never-allowed) ids to -inf."""
    return cond + (scale - 1.0) * (cond - uncond)


@dataclass
class Request:
    """One generation. `prompt` holds ids (starting with `<s>`); `force` ids open the output."""

    prompt: Sequence[int]
    max_new_tokens: int = 256
    sampling: ModalitySampling = field(default_factory=ModalitySampling.default)
    seed: int = 0
    cfg_scale: float = 1.0  # classifier-free guidance on image and audio spans; 1 = off
    force: Sequence[int] = ()  # e.g. [<box>] for grounding, [<boi>] (+ <size_h> <size_w>: that grid) for t2i
    stop_after_span: bool = False  # finish as soon as the first image/audio/box span closes
    stop_ids: Sequence[int] = ()  # finish after generating one of these ids (e.g. `</ref>`)


@dataclass
class Result:
    tokens: list[int]  # generated ids (forced ones included), without the prompt or trailing pad
    probs: list[float]  # probability of each generated id under the constrained distribution
    modes: list[int]  # grammar mode each id was generated in (TEXT/IMAGE/AUDIO/BOX)
    finish: str  # 'eos' | 'length' | 'span' | 'stop'


# A callback per step: (request index, token id, mode it was generated in) for every live row.
TokenCallback = Callable[[int, int, int], None]


class Engine:
    """Generates for batches of requests with one model and one token space."""

    def __init__(self, model, space: TokenSpace, device="cpu", dtype=None,
                 max_audio_frames: int | None = None, max_len: int | None = None, native: bool = True,
                 max_image_tokens: int | None = None):
        """max_image_tokens: the most codes of an image whose grid the model chooses (the image
        tokenizer's `max_tokens`; default the square grid of the space)."""
        self.model = model
        if dtype is None:
            dtype = next(model.parameters()).dtype
        # The native decode step (same logits as model.decode) where the kernel loads and the model fits it.
        self.native = NativeDecoder.load(model) if native else None
        self.space = space
        self.device = torch.device(device)
        self.dtype = dtype
        self.constrainer = Constrainer(space, max_audio_frames=max_audio_frames, device=self.device,
                                       max_image_tokens=max_image_tokens)
        self.max_len = int(max_len or model.cfg.max_seq_len)
        if model.cfg.vocab_size < space.vocab_size:
            raise ValueError(f"model vocab {model.cfg.vocab_size} < token space vocab {space.vocab_size}")

    def context_room(self, prompt_len: int) -> int:
        """How many tokens can still be generated after a prompt of this length."""
        return self.max_len - prompt_len

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], on_token: TokenCallback | None = None,
                 cfg_rows: str = "auto") -> list[Result]:
        """Run all requests as one batch: the prefill, then per step each row's token (guidance mixed
        in, the grammar's mask, the row's sampler or forced id), the grammar and stop bookkeeping,
        and the decode step that feeds the tokens back. cfg_rows='always' keeps unconditional rows
        even at scale 1 (used to check that guidance at scale 1 is exactly the conditional branch)."""
        if len(requests) == 0:
            return []
        self._check(requests)
        con, n = self.constrainer, len(requests)
        prompts = [list(map(int, r.prompt)) for r in requests]
        state = con.from_prompts(prompts)  # grammar state of the request rows; a prompt may end inside a span
        guided = [i for i, r in enumerate(requests) if r.cfg_scale != 1.0 or cfg_rows == "always"]
        max_new = max(r.max_new_tokens for r in requests)
        logits, cache, guidance = self._prefill(requests, prompts, state, guided, max_new)  # logits [B, V]
        native = self.native if self.native is not None and self.native.applies(cache) else None
        picker = _Picker(requests, self.space.pad, self.device)
        out = _Outputs(requests, state.mode.tolist())
        rows = None  # the grammar's row index of the state, when the native step needed it already
        for step in range(max_new):
            mode_before = state.mode.clone() if guidance.active else None  # [n], for the CFG rows' feed
            live = out.live(self.device)  # [n] bool; None while every row is generating
            # out.modes (the rows' modes, kept in Python) lets the grammar skip checks no row needs
            cond = self._constrain(guidance.mix(logits, state.mode), state, out.left(), out.modes, rows)  # [n, V]
            tok, prob = picker.pick(cond, out.modes, live, step, partial(con.fits, state))  # [n], [n]
            con.advance(state, tok, active=live, modes=out.modes)
            finished = out.record(tok.tolist(), prob.tolist(), state.mode.tolist(), on_token)
            if finished:
                con.finish(state, torch.tensor([i in finished for i in range(n)], device=self.device))
            if out.all_done() or step == max_new - 1:
                break
            if native is not None:
                # The ids any row may emit next: the native step computes only those logits.
                rows = con.row_index(state, modes=out.modes)
                span = con.vocab_span(rows, min(out.left()))
                decode = partial(native.step, vocab=span)
            else:
                decode = self.model.decode
            logits = guidance.feed(tok, mode_before, state.mode, cache, decode)  # [B, V]
        return out.results()

    def _check(self, requests: Sequence[Request]) -> None:
        for r in requests:
            if len(r.prompt) == 0:
                raise ValueError("empty prompt")
            if r.max_new_tokens <= 0:
                raise ValueError("max_new_tokens must be positive")
            if len(r.prompt) + r.max_new_tokens > self.max_len:
                raise ValueError(f"prompt ({len(r.prompt)}) + max_new_tokens ({r.max_new_tokens}) "
                                 f"exceed the context ({self.max_len})")

    def _prefill(self, requests: Sequence[Request], prompts: list[list[int]], state: ConstraintState,
                 guided: list[int], max_new: int) -> tuple[torch.Tensor, KVCache, _Guidance]:
        """Rows 0..n-1 are the requests; then one unconditional row per guided request, holding `<s>`
        plus the open span's tokens when the prompt ends inside a span. All rows are left-padded into
        one batch and run into a fresh cache with room for `max_new` more tokens.
        Returns the logits [B, V] of every row's next token, the cache and the CFG rows."""
        sp, dev = self.space, self.device
        u_prompts = [_uncond_prompt(prompts[i], int(state.mode[i]), sp) for i in guided]
        rows = prompts + u_prompts
        B, width = len(rows), max(len(p) for p in rows)
        ids = torch.full((B, width), sp.pad, dtype=torch.long, device=dev)  # [B, W], left-padded
        valid = torch.zeros(B, width, dtype=torch.bool, device=dev)  # [B, W]
        for b, p in enumerate(rows):
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[b, width - len(p):] = True
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)  # [B, W]: each row counts from 0
        cache = KVCache.empty(self.model.cfg, B, width + max_new, device=dev, dtype=self.dtype)
        mask = None if bool(valid.all()) else valid
        logits = self.model.prefill(ids, cache, positions=positions, attention_mask=mask).float()  # [B, V]
        guidance = _Guidance(
            n=len(prompts), pad=sp.pad,
            partner=torch.tensor(guided, dtype=torch.long, device=dev),
            scale=torch.tensor([requests[i].cfg_scale for i in guided], device=dev)[:, None],
            # the span of an unconditional prompt `<s> <opener> …` begins right after `<s>`
            span_start=torch.tensor([width - len(p) + 1 if len(p) > 1 else -1 for p in u_prompts],
                                    dtype=torch.long, device=dev),
        )
        return logits, cache, guidance

    def _constrain(self, logits: torch.Tensor, state: ConstraintState, left: list[int],
                   modes: list[int], rows: torch.Tensor | None) -> torch.Tensor:
        """The grammar's mask on logits [n, V] (in place): disallowed ids -inf. left: tokens each row
        may still generate; near the end of a budget, spans that would not fit are not opened."""
        con = self.constrainer
        remaining = torch.tensor(left, device=self.device) if min(left) < con.tight else None  # [n]
        return con.apply(logits, state, remaining, modes=modes, rows=rows)


def _uncond_prompt(prompt: list[int], mode: int, space: TokenSpace) -> list[int]:
    """The unconditional row of a guided request: `<s>`, plus the prompt's open image/audio span."""
    if mode not in (IMAGE, AUDIO):
        return [space.bos]
    opener = space.boi if mode == IMAGE else space.boa
    return [space.bos] + prompt[len(prompt) - 1 - prompt[::-1].index(opener):]


@dataclass
class _Guidance:
    """The classifier-free-guidance rows of a batch: row n + j is the unconditional twin of request
    row `partner[j]` (see the module docstring)."""

    n: int  # request rows (they come first)
    pad: int
    partner: torch.Tensor  # [m] long
    scale: torch.Tensor  # [m, 1]
    span_start: torch.Tensor  # [m] long: cache slot where row n + j's open span began (-1: none)

    @property
    def active(self) -> bool:
        return self.partner.numel() > 0

    def mix(self, logits: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] -> the request rows' logits [n, V], guided inside image/audio spans.
        mode [n]: each request row's grammar mode before this step's token."""
        cond = logits[: self.n]  # [n, V]
        if not self.active:
            return cond
        u = logits[self.n:]  # [m, V]
        c = cond[self.partner]  # [m, V]
        in_media = ((mode[self.partner] == IMAGE) | (mode[self.partner] == AUDIO))[:, None]  # [m, 1]
        mixed = cfg_mix(c, u, self.scale)  # [m, V]
        cond = cond.clone()
        cond[self.partner] = torch.where(in_media, mixed, c)
        return cond

    def feed(self, tok: torch.Tensor, mode_before: torch.Tensor | None, mode: torch.Tensor, cache: KVCache,
             decode: Callable[[torch.Tensor, KVCache], torch.Tensor]) -> torch.Tensor:
        """Run the decode step on this step's tokens tok [n]; logits [B, V] (fp32) of the next.

        Request rows feed their token. An unconditional row follows its partner inside media spans
        and is fed invalid padding otherwise; when its partner closes a span, the span's slots are
        invalidated and the row's position goes back to 1 (`<s>` only). mode_before / mode [n]:
        the partners' grammar modes before and after the token."""
        if not self.active:
            return decode(tok[:, None], cache).float()
        n, B = self.n, self.n + len(self.partner)
        p_prev = mode_before[self.partner]  # [m]
        p_mode = mode[self.partner]  # [m]: IMAGE/AUDIO once the opener is out
        was_in = (p_prev == IMAGE) | (p_prev == AUDIO)
        follows = (p_mode == IMAGE) | (p_mode == AUDIO)  # opener or span code
        u_ids = torch.where(follows, tok[self.partner], self.pad)  # [m]
        slot = cache.length
        u_rows = torch.arange(n, B, device=tok.device)
        self.span_start = torch.where(follows & ~was_in, slot, self.span_start)
        logits = decode(torch.cat([tok, u_ids])[:, None], cache).float()  # [B, V]
        # The row's view after the step: keep the slot only when it followed the partner.
        cache.valid[u_rows, slot] = follows
        base_pos = torch.where(follows, cache.next_pos[u_rows], cache.next_pos[u_rows] - 1)
        # A closing token (<eoi>/<eoa>) is not fed: drop the whole span, back to `<s>` only.
        closing = was_in & ~follows
        if bool(closing.any()):
            for j in closing.nonzero()[:, 0].tolist():
                cache.valid[n + j, int(self.span_start[j]): slot + 1] = False
            base_pos = torch.where(closing, 1, base_pos)
            self.span_start = torch.where(closing, -1, self.span_start)
        cache.next_pos[u_rows] = base_pos
        cache.padded = True
        return logits


class _Picker:
    """Each request row's choice of token: sampled with the parameters of the modality it is
    generating and its own generator, or the id its request forces at this step."""

    def __init__(self, requests: Sequence[Request], pad: int, device: torch.device):
        self.pad = pad
        self.params = [r.sampling.table() for r in requests]  # per request: (temps, top_ks, top_ps)
        self.gens = make_generators([r.seed for r in requests], device=device)
        n = len(requests)
        self.force_len = max((len(r.force) for r in requests), default=0)
        self.forced = torch.full((n, max(1, self.force_len)), -1, dtype=torch.long, device=device)  # [n, F]
        for i, r in enumerate(requests):
            if len(r.force):
                self.forced[i, : len(r.force)] = torch.tensor(list(r.force), dtype=torch.long)
        self.rows = torch.arange(n, device=device)

    def pick(self, logits: torch.Tensor, modes: list[int], live: torch.Tensor | None, step: int,
             fits: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [n] from constrained logits [n, V], and the probability of each under the constrained
        distribution [n]. modes: each row's grammar mode; finished rows (live False) get `<pad>`.

        A forced id must fit the stream's structure (`fits`: ids [n] -> bool [n]) but not the limits
        on the model's own choices (room left, its grid budget): like a prompt, it is the caller's
        choice, e.g. `<boi> <size_h> <size_w>` with just the budget that grid needs."""
        modality = [min(md, BOX) for md in modes]  # text/image/audio/loc parameter set
        tok, prob = sample(logits, [self.params[i][0][k] for i, k in enumerate(modality)],
                           [self.params[i][1][k] for i, k in enumerate(modality)],
                           [self.params[i][2][k] for i, k in enumerate(modality)], self.gens)
        if step < self.force_len:
            f = self.forced[:, step]  # [n], -1: not forced
            use = (f >= 0) if live is None else (f >= 0) & live
            if bool(use.any()):
                ok = fits(f.clamp_min(0)) | ~use
                if not bool(ok.all()):
                    bad = int((~ok).nonzero()[0, 0])
                    raise ValueError(f"forced token {int(f[bad])} is not allowed at step {step} "
                                     f"of request {bad}")
                tok = torch.where(use, f, tok)
                prob = torch.where(use, logits.softmax(-1)[self.rows, f.clamp_min(0)], prob)
        if live is not None:
            tok = torch.where(live, tok, self.pad)
        return tok, prob


class _Outputs:
    """What each request row generated, and when it stops.

    Kept in Python lists (a handful of rows): on a CPU each tensor op costs microseconds, which at
    batch 1 is a sizeable share of a decode step."""

    def __init__(self, requests: Sequence[Request], modes: list[int]):
        n = len(requests)
        self.max_new = [r.max_new_tokens for r in requests]
        self.stop_after_span = [r.stop_after_span for r in requests]
        self.stop_ids = [set(r.stop_ids) for r in requests]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.probs: list[list[float]] = [[] for _ in range(n)]
        self.token_modes: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.finish = [""] * n
        self.modes = modes  # each row's grammar mode before its next token (DONE once finished)

    def left(self) -> list[int]:
        """Tokens each row may still generate."""
        return [mx - len(t) for mx, t in zip(self.max_new, self.tokens)]

    def live(self, device) -> torch.Tensor | None:
        """BoolTensor [n] of the rows still generating; None while all are."""
        return None if not any(self.done) else torch.tensor([not d for d in self.done], device=device)

    def all_done(self) -> bool:
        return all(self.done)

    def record(self, tok: list[int], prob: list[float], new_modes: list[int],
               on_token: TokenCallback | None) -> list[int]:
        """Keep this step's token of every live row; returns the rows it finished. new_modes: the
        grammar modes after the token."""
        finished = []
        for i, t in enumerate(tok):
            if self.done[i]:
                continue
            self.tokens[i].append(t)
            self.probs[i].append(prob[i])
            self.token_modes[i].append(self.modes[i])
            if on_token is not None:
                on_token(i, t, self.modes[i])
            why = self._stop_reason(i, t, new_modes[i])
            if why:
                self.done[i], self.finish[i] = True, why
                finished.append(i)
                new_modes[i] = DONE
        self.modes = new_modes
        return finished

    def _stop_reason(self, i: int, tok: int, new_mode: int) -> str:
        """Why row i stops after `tok` ('' = it goes on): `</s>`, a closed span (when asked), a stop
        id, or the budget, in that order."""
        if new_mode == DONE:
            return "eos"
        if self.stop_after_span[i] and self.modes[i] != TEXT and new_mode == TEXT:
            return "span"
        if tok in self.stop_ids[i]:
            return "stop"
        if len(self.tokens[i]) >= self.max_new[i]:
            return "length"
        return ""

    def results(self) -> list[Result]:
        return [Result(t, p, m, f or "length")
                for t, p, m, f in zip(self.tokens, self.probs, self.token_modes, self.finish)]

"""The decoding engine: batched prefill + decode on a KV cache, constrained, with CFG.

The engine knows only token ids. A batch of `Request`s is left-padded into one cache; each step
runs the model on one token per row, mixes in the classifier-free-guidance branch, masks the
logits with the stream grammar (`Constrainer`), samples with each row's own parameters and
generator, and advances the grammar.

Classifier-free guidance (image and audio spans). A request with `cfg_scale != 1` gets a second,
*unconditional* row in the same batch, with its own cache rows. That row holds only `<s>`; while
its partner writes text it is fed `<pad>` into slots marked invalid (so it still sees only `<s>`).
When the partner opens an image/audio span, the unconditional row is fed the same span tokens as
valid slots, so it sees `<s> <boi> c_1 … c_k`: the span opened without the prompt. Inside the span
the partner samples from `c + (s − 1)·(c − u)` (= `u + s·(c − u)`, written so that s = 1 gives `c`
bit for bit). When the span closes, the span slots are invalidated again and the row's position
goes back to 1, ready for the next span.

Per step the Python work is a fixed handful of tensor ops on [B, V] (no per-token Python loops
over the vocabulary, no mask rebuilding): the cache is preallocated, masks come from a table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..tokenizers.token_space import TokenSpace
from .constraints import AUDIO, BOX, DONE, IMAGE, TEXT, Constrainer
from .fast import FastDecoder
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
    force: Sequence[int] = ()  # e.g. [<box>] for grounding, [<boi>] for text-to-image
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
                 max_audio_frames: int | None = None, max_len: int | None = None, fast: bool = True):
        self.model = model
        if dtype is None:
            dtype = next(model.parameters()).dtype
        # The lean single-token step (same logits as model.decode) when the model has the structure.
        self.fast = FastDecoder(model) if fast and FastDecoder.supports(model) else None
        self.space = space
        self.device = torch.device(device)
        self.dtype = dtype
        self.constrainer = Constrainer(space, max_audio_frames=max_audio_frames, device=self.device)
        self.max_len = int(max_len or model.cfg.max_seq_len)
        if model.cfg.vocab_size < space.vocab_size:
            raise ValueError(f"model vocab {model.cfg.vocab_size} < token space vocab {space.vocab_size}")

    def context_room(self, prompt_len: int) -> int:
        """How many tokens can still be generated after a prompt of this length."""
        return self.max_len - prompt_len

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], on_token: TokenCallback | None = None,
                 cfg_rows: str = "auto") -> list[Result]:
        """Run all requests as one batch. cfg_rows='always' keeps unconditional rows even at
        scale 1 (used to check that guidance at scale 1 is exactly the conditional branch)."""
        from ..model.kv_cache import KVCache

        sp, con, dev = self.space, self.constrainer, self.device
        n = len(requests)
        if n == 0:
            return []
        for r in requests:
            if len(r.prompt) == 0:
                raise ValueError("empty prompt")
            if r.max_new_tokens <= 0:
                raise ValueError("max_new_tokens must be positive")
            if len(r.prompt) + r.max_new_tokens > self.max_len:
                raise ValueError(f"prompt ({len(r.prompt)}) + max_new_tokens ({r.max_new_tokens}) "
                                 f"exceed the context ({self.max_len})")
        # Grammar state of the request rows; the prompt may end inside a span (e.g. with <boi>).
        req_prompts = [list(map(int, r.prompt)) for r in requests]
        state = con.from_prompts(req_prompts)
        # Rows 0..n-1 are the requests; then one unconditional row per guided request, holding `<s>`
        # plus the open span's tokens when the prompt ends inside a span.
        guided = [i for i, r in enumerate(requests) if r.cfg_scale != 1.0 or cfg_rows == "always"]
        m = len(guided)
        B = n + m
        u_prompts = []
        for i in guided:
            p = req_prompts[i]
            tail: list[int] = []
            if int(state.mode[i]) in (IMAGE, AUDIO):
                opener = sp.boi if int(state.mode[i]) == IMAGE else sp.boa
                tail = p[len(p) - 1 - p[::-1].index(opener):]
            u_prompts.append([sp.bos] + tail)
        prompts = req_prompts + u_prompts
        width = max(len(p) for p in prompts)
        max_new = max(r.max_new_tokens for r in requests)
        total = width + max_new
        ids = torch.full((B, width), sp.pad, dtype=torch.long, device=dev)  # [B, W], left-padded
        valid = torch.zeros(B, width, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[b, width - len(p):] = True
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)  # [B, W]: each row counts from 0
        cache = KVCache.empty(self.model.cfg, B, total, device=dev, dtype=self.dtype)
        mask = None if bool(valid.all()) else valid
        logits = self.model.prefill(ids, cache, positions=positions, attention_mask=mask).float()  # [B, V]
        if self.fast is not None:
            decode = self.fast.step  # (ids, cache, vocab span): logits outside the span are -inf
        else:
            def decode(ids, cache, vocab=None):
                return self.model.decode(ids, cache)

        gens = make_generators([r.seed for r in requests], device=dev)
        # Per-step bookkeeping lives in Python lists (a handful of rows): on a CPU each tensor op
        # costs microseconds, which at batch 1 is a sizeable share of a decode step.
        params = [r.sampling.table() for r in requests]  # per request: (temps, top_ks, top_ps) by modality
        max_new_l = [r.max_new_tokens for r in requests]
        stop_span = [r.stop_after_span for r in requests]
        stop_ids = [set(r.stop_ids) for r in requests]
        force_len = max((len(r.force) for r in requests), default=0)
        forced = torch.full((n, max(1, force_len)), -1, dtype=torch.long, device=dev)
        for i, r in enumerate(requests):
            if len(r.force):
                forced[i, : len(r.force)] = torch.tensor(list(r.force), dtype=torch.long)
        g_rows = torch.tensor(guided, dtype=torch.long, device=dev)  # [m] partner of each uncond row
        g_scale = torch.tensor([requests[i].cfg_scale for i in guided], device=dev)[:, None]  # [m, 1]
        # Slot where each unconditional row's current span began (-1: none open).
        u_span_start = torch.tensor([width - len(p) + 1 if len(p) > 1 else -1 for p in u_prompts],
                                    dtype=torch.long, device=dev)
        rows_n = torch.arange(n, device=dev)

        out_tok: list[list[int]] = [[] for _ in range(n)]
        out_prob: list[list[float]] = [[] for _ in range(n)]
        out_mode: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        finish = [""] * n
        modes = state.mode[:n].tolist()  # each row's grammar mode before this step's token
        left = list(max_new_l)  # tokens each row may still generate

        for step in range(max_new):
            cond = logits[:n]  # [n, V]
            mode_t = state.mode.clone() if m else None  # [n] (for the CFG rows' bookkeeping)
            if m:
                u = logits[n:]  # [m, V]
                c = cond[g_rows]
                in_media = ((state.mode[g_rows] == IMAGE) | (state.mode[g_rows] == AUDIO))[:, None]
                mixed = cfg_mix(c, u, g_scale)  # [m, V]
                cond = cond.clone()
                cond[g_rows] = torch.where(in_media, mixed, c)
            remaining = torch.tensor(left, device=dev) if min(left) < con.tight else None  # room checks
            maybe_box = BOX in modes
            cond = con.apply(cond, state, remaining, maybe_box=maybe_box)
            modality = [min(md, BOX) for md in modes]  # text/image/audio/loc parameter set
            tok, prob = sample(cond, [params[i][0][k] for i, k in enumerate(modality)],
                               [params[i][1][k] for i, k in enumerate(modality)],
                               [params[i][2][k] for i, k in enumerate(modality)], gens)
            live = None if not any(done) else torch.tensor([not d for d in done], device=dev)  # [n]
            if step < force_len:
                f = forced[:, step]
                use = (f >= 0) if live is None else (f >= 0) & live
                if bool(use.any()):
                    ok = torch.isfinite(cond[rows_n, f.clamp_min(0)]) | ~use
                    if not bool(ok.all()):
                        bad = int((~ok).nonzero()[0, 0])
                        raise ValueError(f"forced token {int(f[bad])} is not allowed at step {step} "
                                         f"of request {bad}")
                    tok = torch.where(use, f, tok)
                    prob = torch.where(use, cond.softmax(-1)[rows_n, f.clamp_min(0)], prob)
            if live is not None:
                tok = torch.where(live, tok, sp.pad)
            con.advance(state, tok, active=live, maybe_box=maybe_box)
            tok_l, prob_l, new_modes = tok.tolist(), prob.tolist(), state.mode[:n].tolist()
            newly = []
            for i in range(n):
                if done[i]:
                    continue
                out_tok[i].append(tok_l[i])
                out_prob[i].append(prob_l[i])
                out_mode[i].append(modes[i])
                if on_token is not None:
                    on_token(i, tok_l[i], modes[i])
                # Stop conditions, per row: </s>, a closed span (when asked), a stop id, or the budget.
                if new_modes[i] == DONE:
                    finish[i] = "eos"
                elif stop_span[i] and modes[i] != TEXT and new_modes[i] == TEXT:
                    finish[i] = "span"
                elif tok_l[i] in stop_ids[i]:
                    finish[i] = "stop"
                elif len(out_tok[i]) >= max_new_l[i]:
                    finish[i] = "length"
                else:
                    continue
                done[i] = True
                newly.append(i)
                new_modes[i] = DONE
            if newly:
                con.finish(state, torch.tensor([i in newly for i in range(n)], device=dev))
            modes = new_modes
            left = [mx - len(t) for mx, t in zip(max_new_l, out_tok)]
            if all(done) or step == max_new - 1:
                break
            # The ids any row may emit next: the decode step computes only those logits.
            span = con.vocab_span(modes, state.pos.tolist(), min(left))
            # Next inputs: request rows feed their token; unconditional rows follow their partner
            # inside media spans and are fed invalid padding otherwise.
            step_ids = tok
            if m:
                p_tok = tok[g_rows]
                p_mode = state.mode[g_rows]  # mode after the token: IMAGE/AUDIO once the opener is out
                p_prev = mode_t[g_rows]
                follows = (p_mode == IMAGE) | (p_mode == AUDIO)  # opener or span code
                u_ids = torch.where(follows, p_tok, sp.pad)
                step_ids = torch.cat([tok, u_ids])
                slot = cache.length
                u_rows = torch.arange(n, B, device=dev)
                opened = follows & ~((p_prev == IMAGE) | (p_prev == AUDIO))
                u_span_start = torch.where(opened, slot, u_span_start)
                logits = decode(step_ids[:, None], cache, span).float()
                # The row's view after the step: keep the slot only when it followed the partner.
                cache.valid[u_rows, slot] = follows
                base_pos = torch.where(follows, cache.next_pos[u_rows], cache.next_pos[u_rows] - 1)
                # A closing token (<eoi>/<eoa>) is not fed: drop the whole span, back to `<s>` only.
                closing = ((p_prev == IMAGE) | (p_prev == AUDIO)) & ~follows
                if bool(closing.any()):
                    for j in closing.nonzero()[:, 0].tolist():
                        cache.valid[n + j, int(u_span_start[j]): slot + 1] = False
                    base_pos = torch.where(closing, 1, base_pos)
                    u_span_start = torch.where(closing, -1, u_span_start)
                cache.next_pos[u_rows] = base_pos
                cache.padded = True
            else:
                logits = decode(step_ids[:, None], cache, span).float()

        return [Result(out_tok[i], out_prob[i], out_mode[i], finish[i] or "length") for i in range(n)]

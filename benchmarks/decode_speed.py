"""Decode speed of anymodal's sampling engine vs HF transformers' Chameleon `generate`; prints JSON.

Both get the demo model's dimensions (configs/model/demo.yaml) and the same random weights (ours
copied into HF's layout) and the same prompt. Measured, with repetitions alternating between the
two so that load from other processes hits both alike, medians reported:

- batch 1: new tokens per second (prefill included, greedy and sampled with top-k);
- batch 8: new tokens per second over the whole batch;
- image latency: seconds for one demo image (h·w codes + `<eoi>`) with classifier-free guidance on
  (ours only: HF's Chameleon has no CFG for image spans).

Ours runs the full engine (grammar masks, per-row samplers, stop conditions); HF runs
`generate(min_new_tokens=N, max_new_tokens=N)` so both produce N tokens. `batch1_greedy_model_step`
is ours with `Transformer.decode` as the decode step instead of the native kernel
(anymodal/kernels/decode.py): the engine's fallback where the kernel does not apply.
Every case is measured at each thread count of `--threads` (default: 1 and all cores), both
implementations with the same count.

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/decode_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from anymodal.config import load_config
from anymodal.model import ModelConfig, Transformer
from anymodal.model.hf import hf_chameleon, to_hf_state_dict
from anymodal.sample.engine import Engine, Request
from anymodal.sample.sampling import ModalitySampling
from anymodal.tokenizers.token_space import TokenSpace, round_up


def demo_space(text_size=1200, loc_bins=64, image_k=1024, grid=(8, 8), n_q=4, audio_k=512) -> TokenSpace:
    """A token space shaped like the demo world's (text 1200 with 64 loc bins, 8x8 images, 4x512 audio)."""
    image_offset = text_size
    audio_offset = image_offset + image_k
    used = audio_offset + n_q * audio_k
    return TokenSpace(text_size=text_size, unk=0, bos=1, eos=2, pad=3, boi=4, eoi=5, boa=6, eoa=7, box=8, ebox=9,
                      ref=10, eref=11, loc_offset=12, loc_bins=loc_bins, image_offset=image_offset,
                      image_codebook_size=image_k, image_grid=grid, audio_offset=audio_offset, audio_n_q=n_q,
                      audio_codebook_size=audio_k, audio_frame_rate=50.0, audio_sample_rate=16000,
                      vocab_size=round_up(used))


def build_hf(cfg: ModelConfig, ours: Transformer, attn: str):
    model = hf_chameleon(cfg, attn)
    model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    model.generation_config.pad_token_id = 3
    model.generation_config.eos_token_id = None
    return model.eval()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # HF's generate may return before its last kernels ran
    return time.perf_counter() - t0


def measure(cases, image_run, reps: int, image_tokens: int, cfg: float) -> dict:
    """Alternating repetitions of every case (ours, then HF), then the image-latency run; medians."""
    counts: dict[str, dict[str, int]] = {k: {} for k in cases}
    times: dict[str, dict[str, list[float]]] = {k: {"ours": [], "hf": []} for k in cases}
    for k, (o, h) in cases.items():  # warm-up (allocator, oneDNN primitives, thread pool)
        counts[k]["ours"], counts[k]["hf"] = o(), h()
    image_times: list[float] = []
    image_run()
    for _ in range(reps):
        for k, (o, h) in cases.items():
            times[k]["ours"].append(timed(o))
            times[k]["hf"].append(timed(h))
        image_times.append(timed(image_run))
    result = {}
    for k in cases:
        entry = {}
        for who in ("ours", "hf"):
            med = statistics.median(times[k][who])
            entry[who] = {"s_median": round(med, 4), "s_reps": [round(t, 4) for t in times[k][who]],
                          "new_tokens": counts[k][who], "tokens_per_s": round(counts[k][who] / med, 1)}
        entry["speedup_vs_hf"] = round(entry["ours"]["tokens_per_s"] / entry["hf"]["tokens_per_s"], 2)
        result[k] = entry
    result["image_latency"] = {
        "tokens": image_tokens, "cfg": cfg, "s_median": round(statistics.median(image_times), 4),
        "s_reps": [round(t, 4) for t in image_times],
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--batch", type=int, default=8, help="the batched measurement's batch size")
    ap.add_argument("--reps", type=int, default=7, help="alternating repetitions per measurement")
    ap.add_argument("--threads", default="1,all",
                    help="comma-separated torch thread counts to measure at ('all' = every core); both "
                         "implementations get the same count. Run it alone: on a machine with other busy "
                         "processes, spinning threads make multi-threaded figures meaningless")
    ap.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the image-latency run")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (both models); on CUDA --threads is ignored")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and KV cache of both models")
    ap.add_argument("overrides", nargs="*", help="model config key=value overrides")
    args = ap.parse_args()

    thread_counts = [(os.cpu_count() or 1) if t.strip() == "all" else int(t) for t in args.threads.split(",")]
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cuda":
        thread_counts = thread_counts[:1]  # the host threads barely matter there
    torch.manual_seed(0)
    space = demo_space()
    cfg = load_config(ModelConfig, f"model/{args.preset}.yaml", [f"vocab_size={space.vocab_size}", *args.overrides])
    ours = Transformer(cfg).eval()
    hf = build_hf(cfg, ours, args.hf_attn).to(device, dtype)
    ours = ours.to(device, dtype)
    engine = Engine(ours, space, device=device)  # the native kernel applies to CPU fp32 models only
    model_step_engine = Engine(ours, space, device=device, native=False)  # the same engine decoding with model.decode
    g = torch.Generator().manual_seed(1)
    # Prompts of ordinary text ids (above the specials and loc pieces).
    prompt = torch.randint(space.loc_offset + space.loc_bins, space.text_size, (args.batch, args.prompt_len), generator=g)
    prompt[:, 0] = space.bos
    hf_prompt = prompt.to(device)
    N = args.new
    greedy = ModalitySampling.uniform(0.0)
    topk = ModalitySampling.uniform(1.0, top_k=50)

    def ours_run(rows: int, sampling: ModalitySampling, eng: Engine = engine):
        reqs = [Request(prompt[i].tolist(), N, sampling, seed=i) for i in range(rows)]
        res = eng.generate(reqs)
        return sum(len(r.tokens) for r in res)

    def hf_run(rows: int, sample: bool):
        kw = dict(do_sample=True, top_k=50, temperature=1.0) if sample else dict(do_sample=False)
        with torch.inference_mode():
            out = hf.generate(input_ids=hf_prompt[:rows], attention_mask=torch.ones_like(hf_prompt[:rows]),
                              max_new_tokens=N, min_new_tokens=N, **kw)
        return (out.shape[1] - args.prompt_len) * rows

    def image_run():
        caption = prompt[0, :20].tolist()
        req = Request(caption, space.image_tokens + 2, ModalitySampling.default(), seed=0, cfg_scale=args.cfg,
                      force=[space.boi], stop_after_span=True)
        res = engine.generate([req])[0]
        assert len(res.tokens) == space.image_tokens + 2 and res.tokens[-1] == space.eoi
        return len(res.tokens)

    cases = {
        "batch1_greedy": (lambda: ours_run(1, greedy), lambda: hf_run(1, False)),
        "batch1_topk": (lambda: ours_run(1, topk), lambda: hf_run(1, True)),
        f"batch{args.batch}_greedy": (lambda: ours_run(args.batch, greedy), lambda: hf_run(args.batch, False)),
        "batch1_greedy_model_step": (lambda: ours_run(1, greedy, model_step_engine), lambda: hf_run(1, False)),
    }
    result = {
        "benchmark": "decode_speed",
        "preset": args.preset,
        "params": ours.num_params(),
        "vocab_size": space.vocab_size,
        "prompt_len": args.prompt_len,
        "new_tokens": N,
        "reps": args.reps,
        "hf_attn": args.hf_attn,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "native_kernel": engine.native is not None,
        "by_threads": {},
    }
    for threads in thread_counts:
        torch.set_num_threads(threads)
        result["by_threads"][str(threads)] = measure(cases, image_run, args.reps, space.image_tokens + 2, args.cfg)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Training throughput of anymodal's Transformer vs HF transformers' Chameleon, side by side; prints JSON.

Both models get the same dimensions and the same weights (ours copied into HF's layout). One step is
forward + backward + AdamW step in fp32 on random tokens: ours with `lm_loss` (CE + z-loss, in-place
backward), HF with its own `labels=` loss. Variants of ours: `ours` is what `anymodal train` runs
on a CPU (the native kernels of anymodal.kernels where they build, glibc malloc keeping freed
memory), `ours_pytorch` the same model with every pass in PyTorch, `ours_sdpa` on SDPA's flash kernel,
`ours_compiled` under torch.compile, `ours_packed` the `ours` step on rows packed from documents
(the trainer's condition: attention within each document only, positions restarting; its MFU
credits only the keys the document masks leave, as the trainer's does). Repetitions alternate between the two models so that load from other
processes hits both alike; medians are reported. MFU is measured against the fp32 matmul peak of
this CPU measured in the same run, by a 3 s measurement at start-up and a 0.5 s probe after every
repetition (each the median over large matmuls): `mfu` uses the median of all of them (one
contended measurement cannot move it much), `mfu_vs_startup_peak` the start-up one alone (as the
trainer does), `mfu_paired_median` each repetition against the probe taken right after it, and
`mfu_vs_max_probe` the highest measurement (a stricter ceiling: contention can only lower one).

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/train_throughput.py [--preset demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
from train_cli_throughput import DOC_LENGTHS  # same directory (run as a script)

from anymodal import kernels
from anymodal.config import load_config
from anymodal.model import (
    ModelConfig,
    Transformer,
    fast_paths,
    flops_per_token,
    lm_loss,
    measure_cpu_matmul_peak,
)
from anymodal.model.hf import hf_chameleon, to_hf_state_dict
from anymodal.model.transformer import positions_from_docs
from anymodal.train.cpu_memory import keep_freed_memory


def build_hf(cfg: ModelConfig, ours: Transformer, attn: str):
    model = hf_chameleon(cfg, attn)
    model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    for p in model.model.vqmodel.parameters():  # the image encoder takes no part in text training
        p.requires_grad_(False)
    return model.train()


def packed_doc_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """doc_ids [B, T] of rows packed from documents of the demo world's typical lengths (the mix
    of benchmarks/train_cli_throughput.py's corpus)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(DOC_LENGTHS)

    def draw() -> int:
        return int(lengths[torch.randint(len(lengths), (1,), generator=g)])

    starts = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        t = int(torch.randint(1, draw() + 1, (1,), generator=g))  # a row opens inside a document
        while t < seq:
            starts[row, t] = 1
            t += draw()
    return starts.cumsum(1)


def make_step(kind: str, model, batch: torch.Tensor, modality: torch.Tensor, z_w: float, optim: str,
              doc_ids: torch.Tensor | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[optim]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **flags)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    native = kind in ("ours", "ours_compiled", "ours_packed")
    docs = doc_ids if kind == "ours_packed" else None
    kernels.install(native=native)
    paths = fast_paths.registered()  # this variant's fast paths, set again before each of its steps

    def step() -> float:
        if kind.startswith("ours"):
            fast_paths.register(**paths)  # the registry is global: the other variants change it
            loss = lm_loss(model(inputs, doc_ids=docs), labels, modality, z_loss_weight=z_w, inplace_backward=True).loss
        else:  # HF shifts labels itself
            loss = model(input_ids=inputs, labels=inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=12, help="alternating repetitions per model")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per repetition (median)")
    ap.add_argument(
        "--optim", default="fused", choices=["fused", "foreach", "loop"], help="AdamW variant (both)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (optional path)")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument(
        "--variants",
        default="ours,ours_packed,ours_pytorch,hf",
        help="comma list of: ours, ours_packed, ours_pytorch, ours_sdpa, ours_compiled, hf (see the module doc)",
    )
    ap.add_argument("--no-keep-memory", action="store_true", help="leave glibc malloc as it is (see train/cpu_memory.py)")
    ap.add_argument("overrides", nargs="*", help="model config key=value overrides")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    # as `anymodal train` does on CPU; both models profit (one process), --no-keep-memory measures without
    keep_memory = not args.no_keep_memory and keep_freed_memory()
    native = kernels.install()  # as the trainer does; a kernel that cannot be built stays on PyTorch
    torch.manual_seed(0)
    cfg = load_config(ModelConfig, f"model/{args.preset}.yaml", args.overrides)
    peaks = [measure_cpu_matmul_peak(seconds=3.0)]  # start-up measurement

    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    modality = torch.randint(0, 4, (args.batch, args.seq))
    doc_ids = packed_doc_ids(args.batch, args.seq)
    packed_keys = float(positions_from_docs(doc_ids).float().mean()) + 1.0  # keys per query, masks applied
    variants = args.variants.split(",")
    models = {}
    for k in variants:
        torch.manual_seed(0)  # every variant starts from the same weights
        if k.startswith("ours"):
            m = Transformer(dataclasses.replace(cfg, attention="sdpa") if k == "ours_sdpa" else cfg).train()
            if k == "ours_compiled" or args.compile:
                m = torch.compile(m)
            models[k] = m
        elif k == "hf":
            models[k] = build_hf(cfg, Transformer(cfg), args.hf_attn)
        else:
            raise SystemExit(f"unknown variant {k}")
    steps = {k: make_step(k, m, batch, modality, cfg.z_loss_weight, args.optim, doc_ids) for k, m in models.items()}
    for s in steps.values():  # warm-up (allocator, heap layout, oneDNN primitives, compilation)
        time_steps(s, 3)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.reps):
        order = list(steps) if rep % 2 == 0 else list(steps)[::-1]  # no variant always goes first
        for k in order:
            times[k].append(statistics.median(time_steps(steps[k], args.steps)))
        peaks.append(measure_cpu_matmul_peak(seconds=0.5))  # probe the ceiling between repetitions
    peak, peak_startup, peak_max = statistics.median(peaks), peaks[0], max(peaks)

    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    result = {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "params": Transformer(cfg).num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "compile": args.compile,
        "keep_freed_memory": keep_memory,
        "native_kernels": native,
        "dtype": "fp32",
        "flops_per_token": fpt,  # causal attention counted over (T+1)/2 keys (see model/flops.py)
        "flops_per_token_palm": flops_per_token(cfg, args.seq, causal=False),  # every key counted
        "optimizer": f"AdamW ({args.optim})",
        "packed_mean_keys": packed_keys,  # ours_packed: mean keys per query inside its document
        "cpu_fp32_matmul_peak_gflops": {
            "median": peak / 1e9,
            "startup": peak_startup / 1e9,
            "max_probe": peak_max / 1e9,
            "probes": [round(p / 1e9, 1) for p in peaks[1:]],
        },
    }
    for k, ts in times.items():
        med = statistics.median(ts)
        fpt_k = flops_per_token(cfg, args.seq, keys=packed_keys) if k == "ours_packed" else fpt
        result[k] = {
            "step_s_median": med,
            "step_s_min": min(ts),
            "step_s_reps": [round(t, 4) for t in ts],
            "tokens_per_s": tokens / med,
            "flops_per_token": fpt_k,
            "mfu": tokens / med * fpt_k / peak,  # median step vs the median peak measurement
            "mfu_vs_startup_peak": tokens / med * fpt_k / peak_startup,
            "mfu_vs_max_probe": tokens / med * fpt_k / peak_max,
            "mfu_best_step": tokens / min(ts) * fpt_k / peak,
            # each repetition against the probe taken right after it: slow drift of the machine cancels
            "mfu_paired_median": statistics.median(tokens / t * fpt_k / p for t, p in zip(ts, peaks[1:])),
        }
    if "hf" in result:
        for k in times:
            if k not in ("hf", "ours_packed"):  # packed rows do less attention work: not comparable
                result[k]["speedup_vs_hf"] = result[k]["tokens_per_s"] / result["hf"]["tokens_per_s"]
                # per-repetition ratio: timed back to back, so shared load cancels best here
                ratios = [h / o for o, h in zip(times[k], times["hf"])]
                result[k]["speedup_vs_hf_paired_median"] = statistics.median(ratios)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

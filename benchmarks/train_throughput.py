"""Training throughput of anymodal's Transformer vs HF transformers' Chameleon, side by side; prints JSON.

Both models get the same dimensions and the same weights (ours copied into HF's layout). One step is
forward + backward + AdamW step in fp32 on random tokens: ours with `lm_loss` (CE + z-loss), HF with
its own `labels=` loss. Repetitions alternate between the two models so that load from other
processes hits both alike; medians are reported. MFU is measured against the fp32 matmul peak of
this CPU, measured in the same run (before and after; the higher one is used, so MFU is not flattered).

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/train_throughput.py [--preset demo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from anymodal.config import load_config
from anymodal.model import ModelConfig, Transformer, flops_per_token, lm_loss, measure_cpu_matmul_peak
from anymodal.model.hf import hf_config_kwargs, to_hf_state_dict


def build_hf(cfg: ModelConfig, ours: Transformer, attn: str):
    import transformers

    tiny_vq = dict(embed_dim=4, num_embeddings=8, latent_channels=4, resolution=8, base_channels=32,
                   channel_multiplier=[1], num_res_blocks=1, attn_resolutions=[])
    hf_cfg = transformers.ChameleonConfig(**hf_config_kwargs(cfg), vq_config=tiny_vq)
    hf_cfg._attn_implementation = attn
    model = transformers.ChameleonForConditionalGeneration(hf_cfg)
    model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    for p in model.model.vqmodel.parameters():  # the image encoder takes no part in text training
        p.requires_grad_(False)
    return model.train()


def make_step(kind: str, model, batch: torch.Tensor, modality: torch.Tensor, z_w: float, optim: str):
    params = [p for p in model.parameters() if p.requires_grad]
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[optim]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **flags)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step() -> float:
        if kind == "ours":
            loss = lm_loss(model(inputs), labels, modality, z_loss_weight=z_w).loss
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
    ap.add_argument("--reps", type=int, default=10, help="alternating repetitions per model")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per repetition (median)")
    ap.add_argument("--optim", default="fused", choices=["fused", "foreach", "loop"], help="AdamW variant (both)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (optional path)")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("overrides", nargs="*", help="model config key=value overrides")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(ModelConfig, f"model/{args.preset}.yaml", args.overrides)
    peaks = [measure_cpu_matmul_peak(seconds=2.0)]

    ours = Transformer(cfg).train()
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    modality = torch.randint(0, 4, (args.batch, args.seq))
    models = {"ours": torch.compile(ours) if args.compile else ours}
    if not args.no_hf:
        models["hf"] = build_hf(cfg, ours, args.hf_attn)
    steps = {k: make_step(k, m, batch, modality, cfg.z_loss_weight, args.optim) for k, m in models.items()}
    for s in steps.values():  # warm-up (allocator, oneDNN primitives, compilation)
        time_steps(s, 2)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.reps):
        order = list(steps) if rep % 2 == 0 else list(steps)[::-1]  # neither model always goes first
        for k in order:
            times[k].append(statistics.median(time_steps(steps[k], args.steps)))
        peaks.append(measure_cpu_matmul_peak(seconds=0.5))  # probe the ceiling between repetitions
    # the highest ceiling seen is used, so contention during a probe cannot inflate MFU
    peak = max(peaks)

    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    result = {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "params": ours.num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "compile": args.compile,
        "dtype": "fp32",
        "flops_per_token": fpt,
        "optimizer": f"AdamW ({args.optim})",
        "cpu_fp32_matmul_peak_gflops": {
            "used_max": peak / 1e9,
            "median": statistics.median(peaks) / 1e9,
            "probes": [round(p / 1e9, 1) for p in peaks],
        },
    }
    for k, ts in times.items():
        med = statistics.median(ts)
        result[k] = {
            "step_s_median": med,
            "step_s_min": min(ts),
            "step_s_reps": [round(t, 4) for t in ts],
            "tokens_per_s": tokens / med,
            "mfu": tokens / med * fpt / peak,  # median step vs the highest measured peak
            "mfu_best_step": tokens / min(ts) * fpt / peak,
        }
    if "hf" in result:
        result["speedup_vs_hf"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
        # per-repetition ratio: both models timed back to back, so shared load cancels best here
        ratios = [h / o for o, h in zip(times["ours"], times["hf"])]
        result["speedup_vs_hf_paired_median"] = statistics.median(ratios)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

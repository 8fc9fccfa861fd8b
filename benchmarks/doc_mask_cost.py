"""What attention limited to each packed document costs a training step, against plain causal
attention, on this machine's accelerator; prints JSON.

`anymodal train` packs documents into rows and lets each token see only its own document. With
SDPA that is an explicit mask, which rules out the flash kernel on CUDA; this measures forward +
backward of a preset on random ids both ways (medians of --reps steps after --warmup).

    python benchmarks/doc_mask_cost.py --preset 1b --batch 4 --seq 4096 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from train_cli_throughput import DOC_LENGTHS  # same directory (run as a script)
from train_throughput import packed_doc_ids

from anymodal.config import load_config
from anymodal.model import ModelConfig, Transformer, flops_per_token, lm_loss
from anymodal.model.transformer import positions_from_docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="model config key=value overrides")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = load_config(ModelConfig, f"model/{args.preset}.yaml", ["vocab_size=4608", *args.overrides])
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev, dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=dev)
    modality = torch.zeros(args.batch, args.seq, dtype=torch.long, device=dev)
    doc_ids = packed_doc_ids(args.batch, args.seq).to(dev)
    positions = positions_from_docs(doc_ids)

    def step(docs: bool) -> float:
        t0 = time.perf_counter()
        kw = dict(doc_ids=doc_ids, positions=positions) if docs else {}
        loss = lm_loss(model(ids[:, :-1], **kw), ids[:, 1:], modality, z_loss_weight=cfg.z_loss_weight).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"causal": [], "documents": []}
    for rep in range(args.warmup + args.reps):
        for name in (("causal", "documents") if rep % 2 == 0 else ("documents", "causal")):
            t = step(name == "documents")
            if rep >= args.warmup:
                times[name].append(t)
    tokens = args.batch * args.seq
    out = {"benchmark": "doc_mask_cost", "preset": args.preset, "batch": args.batch, "seq": args.seq,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": args.dtype,
           "mean_doc_tokens": statistics.mean(DOC_LENGTHS)}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"fwd_bwd_s_median": round(med, 4), "tokens_per_s": round(tokens / med)}
    # model FLOPs of the causal pass (the document-masked one does less attention work)
    out["causal"]["model_tflops"] = round(tokens / out["causal"]["fwd_bwd_s_median"] * flops_per_token(cfg, args.seq)
                                          / 1e12, 1)
    out["documents_over_causal_time"] = round(out["documents"]["fwd_bwd_s_median"] / out["causal"]["fwd_bwd_s_median"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

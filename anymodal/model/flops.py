"""FLOPs per token, peak FLOP/s per device, and a CPU matmul peak measurement — for MFU.

MFU = (tokens/s · flops_per_token) / peak FLOP/s. On GPUs the peak is the datasheet's dense number;
on a CPU there is no trustworthy datasheet number, so `measure_cpu_matmul_peak` times large fp32
matmuls on the same machine at start-up and uses that as the ceiling.
"""

from __future__ import annotations

import statistics
import time

import torch

from .config import ModelConfig

# Dense (no sparsity) peak FLOP/s from vendor datasheets; keys are matched as substrings of
# torch.cuda.get_device_name(). "fp32" is plain FP32 (TF32 tensor cores are listed as "tf32").
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},  # SXM
    "GH200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Datasheet peak for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or None if unknown."""
    for key, table in PEAK_FLOPS.items():  # ordered: specific names ("H100 PCIe") before generic
        if key.lower() in device_name.lower():
            return table.get(dtype)
    return None


def flops_per_token(
    cfg: ModelConfig, seq_len: int, training: bool = True, causal: bool = True, keys: float | None = None
) -> float:
    """Model FLOPs per token, for MFU.

    forward = 2·N + 4·L·K·(H·hd)
      2·N        one multiply-add per weight of every matmul: N counts the attention and MLP
                 projections of all L blocks and the output head; the token embedding is a lookup,
                 not a matmul, and norm weights are negligible, so neither is counted.
      4·L·K·Hhd  attention scores q·kᵀ (2·K·H·hd per token per layer) plus the weighted sum of
                 values (another 2·K·H·hd), where K is the number of keys a query attends to:
                 (T+1)/2 on average under a causal mask (causal=True, the work a causal kernel
                 must do), or all T keys (causal=False, the PaLM paper's convention, which counts
                 the masked half too and lets MFU pass 100% for a kernel that skips it).
                 `keys` overrides K with a measured mean: for packed rows under document masking
                 a token attends to (its position in its document + 1) keys, and counting the
                 whole row would credit work that masking removes.
    training = 3 × forward (the backward pass costs two matmuls per forward matmul: grads of the
    inputs and of the weights); activation recomputation is not counted (it is not model work).
    """
    d, hd = cfg.dim, cfg.head_dim
    attn = d * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * d  # wqkv + wo
    mlp = 3 * d * cfg.mlp_hidden  # w13 (gate, up) + w2
    n = cfg.n_layers * (attn + mlp) + d * cfg.vocab_size  # + output head
    if keys is None:
        keys = (seq_len + 1) / 2 if causal else seq_len
    forward = 2 * n + 4 * cfg.n_layers * keys * cfg.n_heads * hd
    return float(3 * forward if training else forward)


def measure_cpu_matmul_peak(seconds: float = 3.0, size: int = 1536, threads: int | None = None) -> float:
    """fp32 matmul throughput of this CPU in FLOP/s: the median over repeated size³ matmuls.

    Runs for about `seconds` (at least 5 timed matmuls after 2 warm-up ones) with the current
    `torch.get_num_threads()` unless `threads` is given (restored afterwards).
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g)
        b = torch.randn(size, size, generator=g)
        out = torch.empty(size, size)
        for _ in range(2):
            torch.mm(a, b, out=out)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < seconds and len(times) < 1000):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
        return 2.0 * size**3 / statistics.median(times)
    finally:
        torch.set_num_threads(old)

"""The transformer, its loss and its KV cache: pure torch, no I/O, no distributed code."""

from .config import ModelConfig
from .flops import PEAK_FLOPS, flops_per_token, measure_cpu_matmul_peak, peak_flops
from .kv_cache import KVCache
from .loss import MODALITY_NAMES, LossOutput, lm_loss
from .transformer import Transformer

__all__ = [
    "KVCache",
    "LossOutput",
    "MODALITY_NAMES",
    "ModelConfig",
    "PEAK_FLOPS",
    "Transformer",
    "flops_per_token",
    "lm_loss",
    "measure_cpu_matmul_peak",
    "peak_flops",
]

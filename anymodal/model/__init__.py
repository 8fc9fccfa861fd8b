"""The transformer, its loss and its KV cache: the reference math in pure torch, no I/O, no
distributed or device-specific code (faster ops are registered from outside in `fast_paths`)."""

from .config import ModelConfig
from .flops import PEAK_FLOPS, flops_per_token, measure_cpu_matmul_peak, peak_flops
from .kv_cache import KVCache
from .loss import LossOutput, lm_loss
from .transformer import Transformer

__all__ = [
    "KVCache",
    "LossOutput",
    "ModelConfig",
    "PEAK_FLOPS",
    "Transformer",
    "flops_per_token",
    "lm_loss",
    "measure_cpu_matmul_peak",
    "peak_flops",
]

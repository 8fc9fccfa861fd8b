"""Pretraining the transformer on token shards with a DeepSpeed engine.

One code path from a laptop to many GPU nodes:

    anymodal train --config train/demo [key=value ...] [--resume]          # one process
    deepspeed --no_local_rank [--hostfile H] [--num_gpus N] \
        --module anymodal.cli train --config train/1b_gpu [--resume]       # N processes per node

`device` picks the accelerator (auto: CUDA when a GPU is visible and DS_ACCELERATOR is not cpu).
On the CPU, DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`, set before deepspeed is imported)
with the gloo backend, fp32; on CUDA, nccl and bf16. A plain process
gets the torch.distributed environment of a world of one (a free local port), so DeepSpeed does
not go looking for MPI.

`LMTrainer` builds the run (model, engine, data) and restores it from a checkpoint; its
`train_step` is one optimizer step: `grad_accum` packed micro-batches per rank
(`anymodal.data.packing`), loss = fp32 cross-entropy + z-loss (`anymodal.model.lm_loss`), AdamW at
the lr of `anymodal.train.schedule` for this step (warmup + cosine decay), gradient clipping; it
returns the step's `StepStats`. A non-finite loss poisons that step's gradients so the update is
skipped everywhere (ZeRO's overflow check, or our optimizer at stage 0) and counted, and the
schedule does not advance; more than `max_nan_skips` skipped steps in a row stop the run.
SIGINT/SIGTERM finish the current step, save a checkpoint and exit; `--resume` continues
bit-exactly from the newest complete checkpoint.

Run dir: config.yaml (resolved TrainConfig), model.yaml (ModelConfig), token_space.json,
ds_config.json, metrics.jsonl (one record per logged step; val and data-mix records),
data_mix.json (planned and realized data mix, anymodal.data.mixture), loss*.png, checkpoints/
(anymodal.train.checkpoint).
Dashboards: `monitor=tensorboard|csv|wandb` turns on that DeepSpeed monitor (`monitor_dir`, default
RUN/monitor; a `deepspeed=` template's own monitor section works as well), and every metrics.jsonl
record also goes to it from rank 0 as `Train/<key>` events at x = optimizer step (nested values
flattened: `Train/tasks/t2i_accuracy`, `Train/mix/kind/t2i`; anymodal.train.metrics.monitor_events).
A resumed run writes the steps after its checkpoint there again (metrics.jsonl drops them instead).
With several nodes the run dir must be on a filesystem all nodes share (each rank writes its ZeRO partition into
the same checkpoint folder, which rank 0 then renames into place).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..config import check_choice, load_config, resolve_config_path, save_config, to_dict
from ..data.mixture import (
    MixCounter,
    Mixture,
    check_kind_weights,
    format_plan,
    parse_phases,
    parse_sources,
    write_mix_json,
)
from ..data.packing import PackedLoader, TokenDataset
from ..errors import ConfigError, UserError
from ..fileio import write_atomic
from ..hf.load import INIT_VOCAB, init_from_hf, model_shape, read_config, read_hf_folder
from ..kernels import install as install_kernels
from ..modality import MODALITY_NAMES
from ..model import ModelConfig, Transformer, flops_per_token, lm_loss, measure_cpu_matmul_peak, peak_flops
from ..tokenizers.text import TextTokenizer
from ..tokenizers.token_space import TokenSpace
from .budget import StepBudget
from .checkpoint import (
    CKPT_DIR,
    latest_checkpoint,
    load_engine_checkpoint,
    rng_state,
    save_engine_checkpoint,
    set_rng_state,
)
from .cpu_memory import keep_freed_memory
from .export import tokenizer_dir
from .metrics import MetricsLog
from .plot import plot_run
from .progress import ProgressBar
from .schedule import SCHEDULES, decay_progress, lr_factor
from .task_eval import TaskEval, check_tasks, print_tasks

PRECISIONS = ("auto", "fp32", "bf16")
CODE_EMBEDDINGS = ("table", "factored")
DEVICES = ("auto", "cpu", "cuda")
# train key `monitor` -> DeepSpeed config section; the package each monitor section needs
MONITORS = {"tensorboard": "tensorboard", "csv": "csv_monitor", "wandb": "wandb"}
MONITOR_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml"}


def _overrides_of(cls: type) -> type:
    """A dataclass with every field of `cls` optional (None = keep the preset's value), so
    `model.n_layers=4` is checked against the real ModelConfig keys."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, Optional[hints[f.name]], dataclasses.field(default=None))  # noqa: UP045
              for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(cls.__name__ + "Overrides", fields)


ModelOverrides = _overrides_of(ModelConfig)


@dataclass
class TrainConfig:
    run_dir: str = "runs/lm"
    # token-shard folder written by `anymodal prepare`, or a weighted mixture of such folders:
    # [{path: DIR, weight: W, name: N}, ...], weight = share of an epoch's tokens (anymodal.data.mixture)
    data: Any = ""
    val_data: str = ""  # optional held-out token shards: val loss every `eval_every` steps
    # sampling-rate factor per document kind, e.g. {t2i: 2, prose: 0} (0 drops a kind); {} = all 1
    kind_weights: dict[str, float] = field(default_factory=dict)
    # a curriculum: epochs before the regular ones, each of `tokens` planned tokens with its own
    # source and kind weights: [{tokens: N, weights: {SOURCE: W}, kind_weights: {KIND: W}}, ...]
    phases: Any = None
    model_preset: str | None = "model/demo"  # ModelConfig YAML (path, or name under configs/); empty = defaults
    model: ModelOverrides = field(default_factory=ModelOverrides)  # preset overrides, e.g. model.n_layers=4
    # start from a Hugging Face Chameleon folder (`anymodal export --format hf`, or any of that
    # format): its config.json fixes the model's shape, its weights the first step (anymodal.hf.load)
    init_from: str = ""
    init_vocab: str = "strict"  # strict: same token space or refuse; map: match rows by token
    # image code embeddings: table (one free row per code) | factored (a code's row is the sum of
    # its factors' rows, the factors its image tokenizer's product code declares, e.g. colour and
    # shape part: `ModelConfig.code_factors`; bundles store the folded table)
    image_code_embedding: str = "table"
    # share of generated images (the answers of t2i/a2i documents) that the model reads back, as
    # inputs, with their codes' first factor left out of the embedding (the colour of (colour,
    # structure) codes): it must then continue a shape from the structure drawn so far, where the
    # colour alone would say which shapes that colour came with in training. Above 0 the model
    # reads every code it generates that way (ModelConfig.blind_decode). Needs
    # image_code_embedding=factored; drawn per document from (seed, epoch, row), so any process
    # count and a resumed run draw the same.
    image_colour_dropout: float = 0.0
    seq_len: int = 512  # tokens per packed row (the model sees rows of seq_len, predicts seq_len labels)
    micro_batch: int = 8  # rows per process per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps in total
    # Wall-clock budget of the whole command in minutes, set-up and final save included (0 = none;
    # resumed runs count earlier time): after every step the last step that fits is re-planned from
    # the measured step time (anymodal.train.budget) and the LR decay is re-aimed at it, so a slower
    # or busier machine trains less but still anneals, and the run ends when its minutes are up.
    max_minutes: float = 0.0
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the decay ends at lr · min_lr_ratio
    warmup: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    weight_decay: float = 0.1  # on matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # gradient-norm clipping; 0 = off
    z_loss_weight: float | None = None  # None = the model config's z_loss_weight
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0..3
    deepspeed: str = ""  # DeepSpeed JSON template; "" = configs/deepspeed/zero{zero_stage}.json
    # auto: CUDA when a GPU is visible, unless DS_ACCELERATOR=cpu is set | cpu | cuda
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    # recompute blocks in backward (less memory, ~30% more compute); None = the model preset's setting
    activation_checkpointing: bool | None = None
    compile: bool = False  # torch.compile the model (GPU; needs a C++ compiler on CPU)
    checkpoint_every: int = 200  # steps between checkpoints (a final one is always written)
    keep_last: int = 3  # checkpoints kept
    log_every: int = 1  # steps between metrics.jsonl records
    # DeepSpeed monitor that also receives every metrics.jsonl record: "" (off) | tensorboard | csv | wandb
    monitor: str = ""
    monitor_dir: str = ""  # tensorboard/csv output (wandb: WANDB_DIR); "" = RUN_DIR/monitor
    eval_every: int = 0  # steps between val-loss passes over val_data; 0 = off
    eval_batches: int = 20  # micro-batches per rank per val pass
    # Task metrics during training (anymodal.train.task_eval): every N steps and at the end, the
    # demo world's checks on up to `task_eval_limit` raw val documents per task; 0 = off.
    task_eval_every: int = 0
    task_eval_data: str = ""  # raw val shards (path, folder, glob) of the demo world
    task_eval_limit: int = 10  # documents per task and pass
    task_eval_tasks: list[str] = field(default_factory=lambda: ["t2i", "a2i", "i2t", "ground", "refer", "asr"])
    tokenizers: str = ""  # tokenizer set for task_eval; "" = the one the training data was prepared with
    seed: int = 0
    cond_dropout: float = 0.1  # drop the prompt of t2i/a2i/tts documents (classifier-free guidance)
    lookahead: int = 64  # packing look-ahead window (documents)
    max_nan_skips: int = 5  # consecutive skipped (NaN/inf) steps before the run stops
    threads: int = 0  # torch CPU threads per process; 0 = cores / processes on this node
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = datasheet (GPU) / measured matmul (CPU)
    progress: bool = True  # tqdm progress bar (rank 0)

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_choice("image_code_embedding", self.image_code_embedding, CODE_EMBEDDINGS)
        if self.image_code_embedding == "factored" and self.zero_stage == 3:
            # ZeRO-3 gathers a parameter for its own module's forward; the factored table is built
            # outside it
            raise ConfigError("image_code_embedding=factored needs zero_stage 0, 1 or 2")
        check_choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("init_vocab", self.init_vocab, INIT_VOCAB)
        if self.monitor not in ("", *MONITORS):
            raise ConfigError(f"config key 'monitor' is {self.monitor!r}; valid choices: {', '.join(MONITORS)}, "
                              "or empty (off)")
        for name in ("seq_len", "micro_batch", "grad_accum", "steps", "checkpoint_every", "log_every",
                     "eval_batches", "lookahead"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be >= 1, got {getattr(self, name)}")
        if self.max_minutes < 0:
            raise ConfigError(f"config key 'max_minutes' must be >= 0, got {self.max_minutes}")
        if self.lr <= 0 or self.warmup < 0 or self.keep_last < 1 or self.clip < 0 or self.max_nan_skips < 0:
            raise ConfigError("config keys lr > 0, warmup >= 0, keep_last >= 1, clip >= 0, max_nan_skips >= 0")
        for name in ("cond_dropout", "image_colour_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config key '{name}' must be in [0, 1], got {getattr(self, name)}")
        if self.image_colour_dropout and self.image_code_embedding != "factored":
            raise ConfigError("image_colour_dropout needs image_code_embedding=factored (a colour factor to leave out)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")
        parse_sources(self.data)  # a malformed source list fails here, before any process starts
        self.kind_weights = check_kind_weights(self.kind_weights)
        parse_phases(self.phases)
        if self.task_eval_every < 0 or self.task_eval_limit < 1:
            raise ConfigError("config keys task_eval_every >= 0 and task_eval_limit >= 1")
        if self.task_eval_every and not self.task_eval_data:
            raise ConfigError("task_eval_every is set but task_eval_data (raw val shards) is not")
        check_tasks(self.task_eval_tasks)


def colour_dropout(micro: dict, share: float, seed: int) -> torch.Tensor | None:
    """[B, T] bool: the answer tokens of the documents of micro-batch `micro` drawn for
    image_colour_dropout (one draw per document piece, from the seed, the epoch and the global row:
    the same on any number of processes and after a resume), or None when `share` is 0."""
    if not share:
        return None
    doc = micro["doc_ids"]  # [B, T]: piece index within the row (padding: one past the last)
    draws = np.stack([np.random.default_rng([seed, 17, micro["epoch"], r]).random(doc.shape[1] + 1)
                      for r in micro["rows"]])  # [B, T + 1]: one per possible piece
    return micro["answer"] & (torch.from_numpy(draws).gather(1, doc) < share)  # [B, T]


class DivergedError(UserError):
    """The loss was NaN/inf for too many steps in a row."""


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float]  # step -> train loss (cross-entropy), steps of this process's run
    model: Any  # the trained Transformer (engine.module)
    run_dir: Path
    interrupted: str | None = None  # signal name when stopped early
    skipped_steps: int = 0


def load_train_config(path: str | Path | None, overrides=()) -> TrainConfig:
    return load_config(TrainConfig, path, list(overrides))


def build_model_config(cfg: TrainConfig, vocab_size: int, code_block: tuple[int, list[int]] | None = None):
    """The preset, the run's `model:` overrides, and what the data fixes (vocab, room for seq_len,
    and with factored code embeddings `code_block` = (first code id, factors))."""
    overrides = {k: v for k, v in to_dict(cfg.model).items() if v is not None}
    if cfg.init_from:  # the folder's shape wins over the preset's
        overrides.update(model_shape(read_config(cfg.init_from)))
    preset = load_config(ModelConfig, cfg.model_preset or None, data=overrides)
    data = {**to_dict(preset), "vocab_size": vocab_size,
            "max_seq_len": max(preset.max_seq_len, cfg.seq_len),
            "activation_checkpointing": preset.activation_checkpointing if cfg.activation_checkpointing is None
            else cfg.activation_checkpointing}
    if code_block is not None:
        data["code_offset"], data["code_factors"] = code_block[0], list(code_block[1])
        data["blind_decode"] = cfg.image_colour_dropout > 0  # it reads its own images as it learnt to
    return load_config(ModelConfig, data=data)


def image_code_factors(tok_dir: Path, space: TokenSpace) -> list[int]:
    """The factors of the image tokenizer's codes (least significant first), checked against the
    data's token space."""
    from ..tokenizers.image import ImageTokenizer

    if not space.image_codebook_size or not (tok_dir / "image").is_dir():
        raise UserError(f"image_code_embedding=factored needs image codes and the image tokenizer ({tok_dir}/image)")
    tok = ImageTokenizer.load(tok_dir / "image")
    if tok.codebook_size != space.image_codebook_size:
        raise UserError(f"{tok_dir}/image has {tok.codebook_size} codes, the data's token space "
                        f"{space.image_codebook_size}")
    return tok.code_factors


# ---- process setup ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SINGLE_PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def use_cuda(device: str = "auto") -> bool:
    """Whether training runs on CUDA: `device` as configured, checked against the machine and against
    DS_ACCELERATOR (DeepSpeed picks its accelerator from it once, at its first import)."""
    accel = os.environ.get("DS_ACCELERATOR", "")
    if device == "auto":
        return torch.cuda.is_available() and accel != "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is visible")
        if accel not in ("", "cuda"):
            raise UserError(f"device=cuda but DS_ACCELERATOR={accel}: unset it or set it to cuda")
        return True
    if accel not in ("", "cpu"):
        raise UserError(f"device=cpu but DS_ACCELERATOR={accel}: unset it or set it to cpu")
    return False


@contextmanager
def distributed(device: str = "auto") -> Iterator[Any]:
    """Pick the accelerator (`use_cuda`), give a lone process a world of one, init torch.distributed
    via DeepSpeed; yields the deepspeed module.

    The environment variables set here are removed on exit, so subprocesses started later do not
    inherit this process's rendezvous port.
    """
    cuda = use_cuda(device)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import
    added: list[str] = []
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        env = dict(zip(SINGLE_PROCESS_ENV, ("0", "0", "1", "1", "127.0.0.1", str(_free_port()))))
        added = [k for k in env if k not in os.environ]
        os.environ.update({k: env[k] for k in added})
    try:
        import deepspeed.ops  # here, not at the top: DS_ACCELERATOR must be set before the first import

        if not cuda and os.environ.get("ANYMODAL_DS_SHM", "0") != "1":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute of
            # C++ build on first use); gloo does the same collectives without it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        yield deepspeed
    finally:
        for k in added:
            os.environ.pop(k, None)


def _local_world() -> int:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict:
    template = cfg.deepspeed or f"deepspeed/zero{cfg.zero_stage}.json"
    path = resolve_config_path(template)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world,
        # stage 0 clips inside our optimizer (which also reports the norm and skips NaN steps)
        "gradient_clipping": cfg.clip if cfg.zero_stage > 0 else 0.0,
        "zero_allow_untested_optimizer": True,
    })
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    if bf16:
        ds["bf16"].setdefault("check_grad_overflow", True)
    ds.setdefault("steps_per_print", 10**12)
    ds.setdefault("wall_clock_breakdown", False)
    if cfg.monitor:  # the section the key names, on; a template's other keys in it (wandb team...) stay
        section = ds.setdefault(MONITORS[cfg.monitor], {})
        section["enabled"] = True
        if cfg.monitor == "wandb":  # no paths in DeepSpeed's wandb section (WANDB_DIR: see LMTrainer)
            section.setdefault("project", "anymodal")
        else:  # DeepSpeed writes into output_path/job_name/
            section["output_path"] = str(monitor_dir(cfg))
            section.setdefault("job_name", Path(cfg.run_dir).resolve().name or "anymodal")
    for name, package in MONITOR_PACKAGES.items():  # DeepSpeed would print a hint and raise ImportError
        if isinstance(ds.get(name), dict) and ds[name].get("enabled") and importlib.util.find_spec(package) is None:
            who = f"monitor={cfg.monitor}" if MONITORS.get(cfg.monitor) == name else f"the DeepSpeed config's {name} monitor"
            raise UserError(f"{who} needs the {package} package: pip install {package}")
    return ds


def monitor_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.monitor_dir) if cfg.monitor_dir else Path(cfg.run_dir) / "monitor"


def make_optimizer(model, cfg: TrainConfig):
    """AdamW, weight decay on matrices only; at ZeRO stage 0 a variant that clips, reports the
    gradient norm and skips non-finite steps (DeepSpeed's ZeRO optimizers do that themselves)."""

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors (on CPU too: the per-tensor loop took ~22 ms of a ~2 s demo step)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    if cfg.zero_stage == 0:
        return ClippingAdamW(groups, clip=cfg.clip, **kw)
    return torch.optim.AdamW(groups, **kw)


class ClippingAdamW(torch.optim.AdamW):
    """AdamW that measures the global gradient norm, skips the update when it is not finite
    (setting `overflow`, which the DeepSpeed engine counts in `skipped_steps`) and otherwise clips
    to `clip` before stepping."""

    def __init__(self, params, clip: float = 0.0, **kw):
        super().__init__(params, **kw)
        self.clip = clip
        self.overflow = False
        self._global_grad_norm = None  # the engine reports it as get_global_grad_norm()

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.clip > 0 and self._global_grad_norm > self.clip:
            torch._foreach_mul_(grads, self.clip / (self._global_grad_norm + 1e-6))
        return super().step(closure)


# ---- signals ---------------------------------------------------------------------------------------
class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT aborts at once."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n[train] {self.signal}: finishing this step, then saving a checkpoint", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---- one step ----------------------------------------------------------------------------------------
# What a micro-batch adds to its step's sums, by name: cross-entropy, z-loss, and per modality the
# summed cross-entropy and the label tokens. With two control values after them (rank 0's budgeted last
# step, others add 0; whether any rank must stop) they travel in one float64 tensor, so the ranks add
# everything up in one small all-reduce per step.
LOSS_SUMS = ("ce", "z_loss", *(f"ce_sum_{m}" for m in MODALITY_NAMES), *(f"labels_{m}" for m in MODALITY_NAMES))
STEP_SUMS = (*LOSS_SUMS, "last_step", "stop")
VAL_SUMS = tuple(n for n in LOSS_SUMS if n not in ("ce", "z_loss"))  # a val pass reports per modality only


def _loss_terms(out) -> dict[str, torch.Tensor]:
    """One micro-batch's `lm_loss` output by the names of `LOSS_SUMS` (0-d tensors on the device)."""
    return {"ce": out.ce.detach(), "z_loss": out.z_loss.detach(),
            **{f"ce_sum_{m}": out.per_modality_sum[m].detach() for m in MODALITY_NAMES},
            **{f"labels_{m}": out.per_modality_count[m] for m in MODALITY_NAMES}}


def _packed(terms: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return torch.stack([terms[n] for n in names]).double()  # [len(names)]


@dataclass
class StepStats:
    """One optimizer step over all its micro-batches and all ranks: what its metrics record holds."""

    step: int  # the step done (1-based)
    loss: float  # cross-entropy (the z-loss term apart), mean over the micro-batches of all ranks
    z_loss: float
    modality_loss: dict[str, float]  # cross-entropy per modality that had label tokens in this step
    modality_tokens: dict[str, float]  # label tokens per modality, all ranks
    lr: float  # the lr of this step's update
    grad_norm: float | None
    tokens: int  # tokens of this step, all ranks
    seconds: float  # wall time of the step, fetching its data included
    mfu: float | None
    tokens_seen: int
    epoch: int
    skipped: bool  # the update was skipped (non-finite loss or gradients)
    skipped_total: int
    stop: bool  # a rank got SIGINT/SIGTERM: save and stop after this step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def record(self) -> dict:
        """The step's metrics.jsonl record."""
        rec = {"step": self.step, "loss": self.loss, "z_loss": self.z_loss, "lr": self.lr,
               "grad_norm": self.grad_norm, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
               "step_time": self.seconds, "tokens_seen": self.tokens_seen, "epoch": self.epoch,
               "skipped": self.skipped, "skipped_total": self.skipped_total}
        rec.update({f"loss_{m}": v for m, v in self.modality_loss.items()})
        return rec


# ---- the run -------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or with `resume`, continue) the run `cfg.run_dir`; see the module docstring."""
    started = time.perf_counter()  # the max_minutes budget counts set-up too
    with distributed(cfg.device) as deepspeed:
        return LMTrainer(cfg, deepspeed, resume, started).run()


class LMTrainer:
    """One process's part of a run: built (and with `resume`, restored) on construction, inside
    `distributed()`; `train_step` runs one optimizer step, `run` the loop with its logging,
    evaluations and checkpoints."""

    def __init__(self, cfg: TrainConfig, deepspeed, resume: bool = False, started: float | None = None):
        self.cfg = cfg
        self.started = time.perf_counter() if started is None else started
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        cuda = dist.get_backend() == "nccl"  # what `distributed()` chose for cfg.device
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if not cuda:
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // _local_world()))
            keep_freed_memory()  # reuse the last step's pages instead of faulting them in again
            native = [name for name, on in install_kernels().items() if on]  # C passes where they build
            if self.rank == 0:
                print(f"[train] native CPU kernels: {', '.join(native) or 'none (PyTorch paths)'}", file=sys.stderr)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
        ds_config = deepspeed_config(cfg, self.world, bf16)  # a bad template or a missing monitor package fails here

        # -- data, model config, run dir
        sources = parse_sources(cfg.data)
        if not sources:
            raise UserError("no training data: set data=DIR (a folder written by `anymodal prepare`) or a list of sources")
        # one folder is a mixture of one: exactly the plain loader's rows
        self.data = Mixture(sources, cfg.kind_weights, parse_phases(cfg.phases))
        space = self.data.space
        code_block = None
        if cfg.image_code_embedding == "factored":
            if cfg.init_from:
                raise UserError("image_code_embedding=factored cannot start from init_from (a plain table)")
            tok_dir = tokenizer_dir(Path(cfg.run_dir), cfg.tokenizers or None, data=cfg.data)
            code_block = (space.image_offset, image_code_factors(tok_dir, space))
        self.model_cfg = build_model_config(cfg, space.vocab_size, code_block)
        self.run_dir = Path(cfg.run_dir)
        ckpt = latest_checkpoint(self.run_dir / CKPT_DIR)
        if ckpt is not None and not resume:
            raise UserError(f"{self.run_dir} already holds checkpoints: continue it with --resume, or pick a new run_dir")
        if self.rank == 0:
            _prepare_run_dir(self.run_dir, cfg, self.model_cfg, space, ckpt is not None)
        self.barrier()
        if resume and ckpt is None and self.rank == 0:
            print(f"[train] no checkpoint in {self.run_dir}: starting from scratch", file=sys.stderr)

        # -- model, optimizer, engine (same seed on every rank: identical initial weights)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        model = Transformer(self.model_cfg)
        if cfg.init_from and ckpt is None:  # a resumed run continues from its checkpoint instead
            text = None
            if cfg.init_vocab == "map":
                text = TextTokenizer.load(tokenizer_dir(self.run_dir, cfg.tokenizers or None) / "text")
            how = init_from_hf(model, read_hf_folder(cfg.init_from), space, cfg.init_vocab, text)
            if self.rank == 0:
                print(f"[train] initialized from {cfg.init_from} ({how}); optimizer fresh", file=sys.stderr)
        self.optimizer = make_optimizer(model, cfg)
        if self.rank == 0:
            write_atomic(self.run_dir / "ds_config.json", json.dumps(ds_config, indent=1))
            if cfg.monitor == "wandb":  # wandb's own files (DeepSpeed's wandb section has no path)
                monitor_dir(cfg).mkdir(parents=True, exist_ok=True)
                os.environ.setdefault("WANDB_DIR", str(monitor_dir(cfg)))
        # no lr scheduler: each step sets the lr from the schedule (see `lr`)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        if self.world == 1 and cfg.zero_stage == 0:
            # one process holds the whole gradient: DeepSpeed's bucketed all-reduce would only copy it
            # into flat buffers and back (~8 ms of a demo step on the 2-core CPU)
            self.engine.enable_backward_allreduce = False
        if cfg.compile:
            self.engine.compile()
        # dashboards: every metrics record also goes to DeepSpeed's monitor (rank 0 writes, others have none)
        monitor = self.engine.monitor
        self.sink = monitor.write_events if self.rank == 0 and monitor.enabled else None
        if isinstance(ds_config.get("wandb"), dict) and ds_config["wandb"].get("enabled"):
            # DeepSpeed logs its own lr at x = samples seen; wandb ignores any x below the last one, so
            # our x = step records would all be dropped. The step-indexed records alone go there (lr too).
            monitor.enabled = False
        self.loader = PackedLoader(self.data, cfg.seq_len, cfg.micro_batch, self.rank, self.world, cfg.grad_accum,
                                   cfg.seed, cfg.cond_dropout, lookahead=cfg.lookahead)
        self.mix = MixCounter(self.data)  # realized tokens per source / kind / modality, kept in the checkpoint meta
        if self.rank == 0:
            print("[train] " + format_plan(self.data.planned()), file=sys.stderr)
        self.val_loader = None
        if cfg.val_data and cfg.eval_every:
            val = TokenDataset(cfg.val_data)
            val.space.check_same(space, f"{cfg.val_data} vs {self.data.path}")
            self.val_loader = PackedLoader(val, cfg.seq_len, cfg.micro_batch, self.rank, self.world, seed=cfg.seed,
                                           shuffle=False, loop=False, lookahead=cfg.lookahead)

        # everything built so far lives for the whole run: keep it out of the cyclic GC's full passes,
        # which otherwise walk the model, optimizer and loader state every few hundred steps
        gc.freeze()
        self.step, self.skipped_total, self.tokens_seen, self.spent = 0, 0, 0, 0.0
        self.total = cfg.steps  # the last step: cfg.steps, or fewer when max_minutes cuts the run
        self.resumed = ckpt is not None
        if self.resumed:
            self.restore(ckpt[1])

        # MFU: model FLOPs per token over the peak of the devices. Attention is counted over the keys
        # document masking leaves (position in its document + 1 per token, this rank's last batch).
        self.peak = _peak_flops(cfg, cuda, bf16, self.world, self.device)
        self.z_weight = self.model_cfg.z_loss_weight if cfg.z_loss_weight is None else cfg.z_loss_weight
        self.tokens_per_step = cfg.micro_batch * cfg.seq_len * cfg.grad_accum * self.world
        self.budget = StepBudget(self.started + cfg.max_minutes * 60.0 - self.spent, cfg.steps)
        self.stop_flag = StopFlag()
        self.engine.train()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def restore(self, ckpt: Path) -> None:
        """Continue from `ckpt`: weights and optimizer, data position, counters, this rank's RNG states.
        The lr needs nothing: it follows from the step."""
        cfg = self.cfg
        meta, rank_state = load_engine_checkpoint(self.engine, ckpt, self.rank)
        self.step, self.skipped_total = meta["step"], meta.get("skipped_total", 0)
        self.tokens_seen, self.spent = meta.get("tokens_seen", 0), float(meta.get("train_seconds", 0.0))
        if cfg.max_minutes and meta.get("budget_steps"):
            self.total = max(self.step, min(cfg.steps, int(meta["budget_steps"])))
        self.loader.load_state_dict(meta["loader"])
        self.mix.load_state_dict(meta.get("mix"))
        if rank_state.get("rng"):
            set_rng_state(rank_state["rng"])
        else:  # a rank the checkpoint did not have (more processes than before)
            torch.manual_seed(cfg.seed + 1000 * self.step + self.rank)
        if self.rank == 0:
            print(f"[train] resumed from {ckpt} (step {self.step})", file=sys.stderr)

    def lr(self) -> float:
        """The lr of the next update: the schedule at the number of updates so far (skipped steps do
        not count), decaying towards the planned last step."""
        cfg = self.cfg
        updates = self.step - self.skipped_total
        return cfg.lr * lr_factor(updates, cfg.warmup, decay_progress(updates, cfg.warmup, self.total),
                                  cfg.min_lr_ratio, cfg.schedule)

    def next_batch(self) -> list[dict]:
        """The next step's micro-batches of this rank."""
        return [next(self.loader) for _ in range(self.cfg.grad_accum)]

    def train_step(self, batch: list[dict], started: float | None = None) -> StepStats:
        """One optimizer step over this rank's micro-batches `batch` (collective: every rank calls it).
        `started`: when the step began (default: now), so that fetching `batch` counts into its time."""
        cfg, engine, device = self.cfg, self.engine, self.device
        t0 = time.perf_counter() if started is None else started
        skipped_before = engine.skipped_steps
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(len(LOSS_SUMS), dtype=torch.float64, device=device)
        for micro in batch:
            ids = micro["ids"].to(device, non_blocking=True)  # [B, T]
            labels = micro["labels"].to(device, non_blocking=True)  # [B, T]
            colourless = colour_dropout(micro, cfg.image_colour_dropout, cfg.seed)
            logits = engine(ids, positions=micro["positions"].to(device), doc_ids=micro["doc_ids"].to(device),
                            drop_first_factor=None if colourless is None else colourless.to(device))
            # The loss is the logits' last use: its backward may overwrite them with their
            # gradient instead of allocating another [B, T, V] buffer.
            out = lm_loss(logits, labels, micro["modality"].to(device), z_loss_weight=self.z_weight,
                          inplace_backward=True)
            loss = out.loss
            if not torch.isfinite(loss):
                loss = loss * float("nan")  # NaN gradients everywhere: the update is skipped
            engine.backward(loss)
            engine.step()
            sums += _packed(_loss_terms(out), LOSS_SUMS)
        last_step = 0
        if self.rank == 0 and cfg.max_minutes:
            now = time.perf_counter()
            self.budget.step_done(self.step + 1, now)
            last_step = self.budget.last_step(self.step + 1, now, self.total)
        packed = torch.cat([sums, sums.new_tensor([last_step, 1.0 if self.stop_flag.signal else 0.0])])
        if self.world > 1:
            dist.all_reduce(packed)
        reduced = dict(zip(STEP_SUMS, packed.tolist()))
        # realized mix: this step's global rows s·G … (s+1)·G from the epoch plan (every rank counts the
        # same, whatever the process count) and all ranks' label tokens per modality
        loader = self.loader
        self.mix.add_rows(loader.plan(loader.epoch), loader.consumed - loader.global_batch, loader.consumed)
        labels_per_modality = {m: reduced[f"labels_{m}"] for m in MODALITY_NAMES}
        self.mix.add_labels(labels_per_modality)
        # ZeRO counts overflow steps in the engine; at stage 0 our optimizer knows (under a bf16
        # wrapper the engine does not see its flag)
        skipped = bool(engine.skipped_steps - skipped_before or getattr(self.optimizer, "overflow", False))
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.skipped_total += skipped
        last_step = int(reduced["last_step"])
        if cfg.max_minutes and last_step > 0 and last_step != self.total:
            self.total = max(self.step, last_step)
        seconds = time.perf_counter() - t0
        tps = self.tokens_per_step / seconds
        mean_keys = float(batch[-1]["positions"].float().mean()) + 1.0
        mfu = tps * flops_per_token(self.model_cfg, cfg.seq_len, keys=mean_keys) / self.peak if self.peak else None
        grad_norm = engine.get_global_grad_norm()
        n = cfg.grad_accum * self.world
        return StepStats(
            step=self.step, loss=reduced["ce"] / n, z_loss=reduced["z_loss"] / n,
            modality_loss={m: reduced[f"ce_sum_{m}"] / c for m, c in labels_per_modality.items() if c > 0},
            modality_tokens=labels_per_modality, lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
            tokens=self.tokens_per_step, seconds=seconds, mfu=mfu, tokens_seen=self.tokens_seen,
            epoch=loader.epoch, skipped=skipped, skipped_total=self.skipped_total, stop=reduced["stop"] > 0)

    def save(self, step: int) -> None:
        """Checkpoint (collective) and, on rank 0, data_mix.json."""
        t0 = time.perf_counter()
        meta = {"loader": self.loader.state_dict(), "skipped_total": self.skipped_total,
                "tokens_seen": self.tokens_seen, "world_size": self.world, "seq_len": self.cfg.seq_len,
                "mix": self.mix.state_dict(), "train_seconds": self.spent + t0 - self.started,
                "budget_steps": self.total if self.cfg.max_minutes else None}
        save_engine_checkpoint(self.engine, self.run_dir / CKPT_DIR, step, {"rng": rng_state()}, meta,
                               self.cfg.keep_last, self.rank, self.barrier)
        if self.rank == 0:
            write_mix_json(self.run_dir / "data_mix.json", self.data, self.mix, step)
        # what the run needs after its last step: one more save, the plots
        self.budget.reserve = (time.perf_counter() - t0) + 1.0 + self.budget.last_eval

    def minutes(self) -> float:
        """Training minutes so far, earlier sessions of a resumed run included."""
        return round((self.spent + time.perf_counter() - self.started) / 60, 3)

    def log(self, metrics: MetricsLog, bar: ProgressBar, stats: StepStats) -> None:
        """The step's metrics record (every `log_every` steps, at the last step and at every skipped
        one) and the progress bar."""
        if stats.step % self.cfg.log_every == 0 or stats.step == self.total or stats.skipped:
            metrics.write(stats.record())
        bar.set_total(self.total)
        bar.update(stats.step, self.minutes() * 60, loss=f"{stats.loss:.4f}", tok_s=f"{stats.tokens_per_s:,.0f}")

    def evaluate(self, metrics: MetricsLog, tasks: TaskEval | None, step: int) -> bool:
        """Val loss and task metrics where they are due after `step` (collective); True when val ran."""
        cfg = self.cfg
        val_now = self.val_loader is not None and step % cfg.eval_every == 0
        if val_now:
            metrics.write({"step": step, **_evaluate(self.engine, self.val_loader, cfg, self.device, self.z_weight,
                                                     self.world)})
        if cfg.task_eval_every and (step % cfg.task_eval_every == 0 or step == self.total):
            t_eval = time.perf_counter()
            if tasks is not None:  # rank 0 measures, the others wait
                rec = tasks()
                metrics.write({"step": step, "minutes": self.minutes(), "tasks": rec})
                print_tasks(step, rec)
            self.barrier()
            self.budget.evaluated(time.perf_counter() - t_eval, cfg.task_eval_every)
        return val_now

    def run(self) -> TrainResult:
        """Train up to the last step (or a stop signal); log, evaluate and checkpoint on the way."""
        cfg, rank = self.cfg, self.rank
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until_step=self.step if self.resumed else None,
                             enabled=rank == 0, sink=self.sink)
        bar = ProgressBar(self.total, self.step, "train", disable=rank != 0 or not cfg.progress)
        tasks = _task_eval(cfg, self.engine.module, self.run_dir) if cfg.task_eval_every and rank == 0 else None
        if tasks is not None and self.step == 0:  # where the curve starts: the untrained model
            metrics.write({"step": 0, "minutes": 0.0, "tasks": tasks()})
            self.budget.evaluated(tasks.seconds[-1], cfg.task_eval_every)
        losses: dict[int, float] = {}
        nan_streak = 0
        last_saved = self.step
        with self.stop_flag, metrics:
            try:
                while self.step < self.total:
                    t0 = time.perf_counter()
                    stats = self.train_step(self.next_batch(), started=t0)
                    step = stats.step
                    if stats.skipped:
                        nan_streak += 1
                    else:
                        nan_streak, losses[step] = 0, stats.loss
                    self.log(metrics, bar, stats)
                    if nan_streak > cfg.max_nan_skips:
                        where = latest_checkpoint(self.run_dir / CKPT_DIR)
                        raise DivergedError(
                            f"loss was NaN/inf for {nan_streak} steps in a row (at step {step}); the run stopped. "
                            f"Last good checkpoint: {where[1] if where else 'none'}. Lower lr, raise warmup or "
                            f"check the data, then --resume")
                    val_ran = self.evaluate(metrics, tasks, step)
                    if val_ran or step == self.total or stats.stop:
                        metrics.write({"step": step, "mix": self.mix.record()})
                    if step % cfg.checkpoint_every == 0 or step == self.total or stats.stop:
                        self.save(step)
                        last_saved = step
                    if stats.stop:
                        break
            finally:
                bar.close()
        if last_saved != self.step:
            self.save(self.step)
        if rank == 0:  # also when no step ran (resumed at the end)
            write_mix_json(self.run_dir / "data_mix.json", self.data, self.mix, self.step)
            plot_run(self.run_dir)
        interrupted = self.stop_flag.signal if self.step < self.total else None
        if rank == 0 and self.total < cfg.steps:
            print(f"[train] max_minutes={cfg.max_minutes:g}: trained {self.total} of {cfg.steps} steps", file=sys.stderr)
        if rank == 0 and interrupted:
            print(f"[train] stopped at step {self.step} by {interrupted}; continue with --resume", file=sys.stderr)
        return TrainResult(self.step, losses, self.engine.module, self.run_dir, interrupted, self.skipped_total)


def _task_eval(cfg: TrainConfig, model, run_dir: Path) -> TaskEval:
    """The in-training task evaluator, with the tokenizer set the training data was prepared with."""
    if cfg.zero_stage == 3:
        raise UserError("task_eval_every needs the whole model in one process; it does not work with zero_stage=3")
    tok_dir = tokenizer_dir(run_dir, cfg.tokenizers or None)
    return TaskEval(model, tok_dir, cfg.task_eval_data, cfg.task_eval_limit, cfg.task_eval_tasks, seed=cfg.seed)


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, model_cfg, space, resuming: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if resuming:
        if (run_dir / "token_space.json").is_file():
            TokenSpace.load(run_dir).check_same(space, f"{run_dir} vs {' + '.join(s.path for s in parse_sources(cfg.data))}")
        if (run_dir / "model.yaml").is_file():
            before = yaml.safe_load((run_dir / "model.yaml").read_text())
            now = to_dict(model_cfg)
            diff = [k for k in now if before.get(k) != now[k] and k != "activation_checkpointing"]
            if diff:
                raise UserError(f"cannot resume {run_dir}: the model config changed ({', '.join(diff)})")
    save_config(cfg, run_dir / "config.yaml")
    save_config(model_cfg, run_dir / "model.yaml")
    space.save(run_dir / "token_space.json")


def _peak_flops(cfg: TrainConfig, cuda: bool, bf16: bool, world: int, device) -> float | None:
    """Total peak FLOP/s of all ranks (the MFU denominator)."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops * world
    if cuda:
        fmt = "bf16" if bf16 else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        p = peak_flops(torch.cuda.get_device_name(), fmt)
        return p * world if p else None
    # every rank measures at once, so the sum is what the processes share of this CPU
    mine = torch.tensor([measure_cpu_matmul_peak(seconds=1.0, size=1024)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(mine)
    return float(mine[0])


def _evaluate(engine, loader, cfg: TrainConfig, device, z_weight: float, world: int) -> dict:
    """Val cross-entropy (overall and per modality) over the first `eval_batches` micro-batches."""
    sums = torch.zeros(len(VAL_SUMS), dtype=torch.float64, device=device)
    loader.epoch, loader.consumed = 0, 0
    engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= cfg.eval_batches:
                break
            logits = engine(batch["ids"].to(device), positions=batch["positions"].to(device),
                            doc_ids=batch["doc_ids"].to(device))
            out = lm_loss(logits, batch["labels"].to(device), batch["modality"].to(device), z_loss_weight=z_weight)
            sums += _packed(_loss_terms(out), VAL_SUMS)
    engine.train()
    if world > 1:
        dist.all_reduce(sums)
    val = dict(zip(VAL_SUMS, sums.cpu()))  # 0-d float64 tensors
    ce = torch.stack([val[f"ce_sum_{m}"] for m in MODALITY_NAMES])
    labels = torch.stack([val[f"labels_{m}"] for m in MODALITY_NAMES])
    total = float(labels.sum())
    rec = {"val_loss": float(ce.sum()) / total if total else None}
    for m in MODALITY_NAMES:
        if val[f"labels_{m}"] > 0:
            rec[f"val_loss_{m}"] = float(val[f"ce_sum_{m}"] / val[f"labels_{m}"])
    return rec

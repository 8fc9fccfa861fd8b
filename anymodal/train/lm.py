"""Pretraining the transformer on token shards with a DeepSpeed engine.

One code path from a laptop to many GPU nodes:

    anymodal train --config train/demo [key=value ...] [--resume]          # one process
    deepspeed --no_local_rank [--hostfile H] [--num_gpus N] \
        --module anymodal.cli train --config train/1b_gpu [--resume]       # N processes per node

Without CUDA the DeepSpeed CPU accelerator is chosen (`DS_ACCELERATOR=cpu`, set before
deepspeed is imported) with the gloo backend, fp32; with CUDA, nccl and bf16. A plain process
gets the torch.distributed environment of a world of one (a free local port), so DeepSpeed does
not go looking for MPI.

Per optimizer step: `grad_accum` packed micro-batches per rank (`anymodal.data.packing`), loss =
fp32 cross-entropy + z-loss (`anymodal.model.lm_loss`), AdamW with warmup + cosine decay, gradient
clipping. A non-finite loss poisons that step's gradients so the update is skipped everywhere
(ZeRO's overflow check, or our optimizer at stage 0) and counted; more than `max_nan_skips`
skipped steps in a row stop the run. SIGINT/SIGTERM finish the current step, save a checkpoint
and exit; `--resume` continues bit-exactly from the newest complete checkpoint.

Run dir: config.yaml (resolved TrainConfig), model.yaml (ModelConfig), token_space.json,
ds_config.json, metrics.jsonl (one record per logged step; val and data-mix records),
data_mix.json (planned and realized data mix, anymodal.data.mixture), loss*.png, checkpoints/.
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
import signal
import socket
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import check_choice, load_config, resolve_config_path, save_config, to_dict
from ..data.mixture import MixCounter, Mixture, check_kind_weights, format_plan, parse_sources, write_mix_json
from ..errors import ConfigError, UserError
from ..hf.load import INIT_VOCAB, init_from_hf, model_shape, read_config, read_hf_folder
from ..model.config import ModelConfig
from ..tokenizers.text import TextTokenizer

PRECISIONS = ("auto", "fp32", "bf16")
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
    model_preset: str | None = "model/demo"  # ModelConfig YAML (path, or name under configs/); empty = defaults
    model: ModelOverrides = field(default_factory=ModelOverrides)  # preset overrides, e.g. model.n_layers=4
    # start from a Hugging Face Chameleon folder (`anymodal export --format hf`, or any of that
    # format): its config.json fixes the model's shape, its weights the first step (anymodal.hf.load)
    init_from: str = ""
    init_vocab: str = "strict"  # strict: same token space or refuse; map: match rows by token
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
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False  # recompute blocks in backward (less memory, ~30% more compute)
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
        check_choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        from .schedule import SCHEDULES

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
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ConfigError(f"config key 'cond_dropout' must be in [0, 1], got {self.cond_dropout}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")
        parse_sources(self.data)  # a malformed source list fails here, before any process starts
        self.kind_weights = check_kind_weights(self.kind_weights)
        if self.task_eval_every < 0 or self.task_eval_limit < 1:
            raise ConfigError("config keys task_eval_every >= 0 and task_eval_limit >= 1")
        if self.task_eval_every and not self.task_eval_data:
            raise ConfigError("task_eval_every is set but task_eval_data (raw val shards) is not")
        from .task_eval import check_tasks

        check_tasks(self.task_eval_tasks)


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


def build_model_config(cfg: TrainConfig, vocab_size: int):
    """The preset, the run's `model:` overrides, and what the data fixes (vocab, room for seq_len)."""
    overrides = {k: v for k, v in to_dict(cfg.model).items() if v is not None}
    if cfg.init_from:  # the folder's shape wins over the preset's
        overrides.update(model_shape(read_config(cfg.init_from)))
    preset = load_config(ModelConfig, cfg.model_preset or None, data=overrides)
    data = {**to_dict(preset), "vocab_size": vocab_size,
            "max_seq_len": max(preset.max_seq_len, cfg.seq_len),
            "activation_checkpointing": bool(cfg.activation_checkpointing or preset.activation_checkpointing)}
    return load_config(ModelConfig, data=data)


# ---- process setup ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SINGLE_PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def setup_distributed() -> tuple[Any, list[str]]:
    """Pick the accelerator, give a lone process a world of one, init torch.distributed via DeepSpeed.

    Returns (the deepspeed module, the environment variables set here); the caller removes those
    when it is done, so subprocesses started later do not inherit this process's rendezvous port.
    """

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import
    added: list[str] = []
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        env = dict(zip(SINGLE_PROCESS_ENV, ("0", "0", "1", "1", "127.0.0.1", str(_free_port()))))
        added = [k for k in env if k not in os.environ]
        os.environ.update({k: env[k] for k in added})
    import deepspeed
    import deepspeed.ops

    if not cuda and os.environ.get("ANYMODAL_DS_SHM", "0") != "1":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute of
        # C++ build on first use); gloo does the same collectives without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return deepspeed, added


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
        if cfg.monitor == "wandb":  # no paths in DeepSpeed's wandb section (WANDB_DIR: see _train)
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
    (setting `overflow`, which the DeepSpeed engine counts in `skipped_steps` and which keeps it
    from stepping the lr scheduler) and otherwise clips to `clip` before stepping."""

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


# ---- the loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or with `resume`, continue) the run `cfg.run_dir`; see the module docstring."""
    started = time.perf_counter()  # the max_minutes budget counts set-up too
    deepspeed, added_env = setup_distributed()
    try:
        return _train(cfg, resume, deepspeed, started)
    finally:
        for k in added_env:
            os.environ.pop(k, None)


def _train(cfg: TrainConfig, resume: bool, deepspeed, started: float) -> TrainResult:
    import numpy as np
    import torch.distributed as dist

    from ..data.packing import PackedLoader, TokenDataset
    from ..kernels import install as install_kernels
    from ..model import MODALITY_NAMES, Transformer, flops_per_token, lm_loss
    from .budget import StepBudget
    from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from .cpu_memory import keep_freed_memory
    from .export import tokenizer_dir
    from .metrics import MetricsLog
    from .schedule import WarmupCosine
    from .task_eval import print_tasks

    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // _local_world()))
        keep_freed_memory()  # reuse the last step's pages instead of faulting them in again
        native = [name for name, on in install_kernels().items() if on]  # C passes where they build
        if rank == 0:
            print(f"[train] native CPU kernels: {', '.join(native) or 'none (PyTorch paths)'}", file=sys.stderr)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    ds_config = deepspeed_config(cfg, world, bf16)  # a bad template or a missing monitor package fails here

    def barrier():
        if world > 1:
            dist.barrier()

    # -- data, model config, run dir
    sources = parse_sources(cfg.data)
    if not sources:
        raise UserError("no training data: set data=DIR (a folder written by `anymodal prepare`) or a list of sources")
    data = Mixture(sources, cfg.kind_weights)  # one folder is a mixture of one: exactly the plain loader's rows
    space = data.space
    model_cfg = build_model_config(cfg, space.vocab_size)
    run_dir = Path(cfg.run_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds checkpoints: continue it with --resume, or pick a new run_dir")
    if rank == 0:
        _prepare_run_dir(run_dir, cfg, model_cfg, space, ckpt is not None)
    barrier()
    if resume and ckpt is None and rank == 0:
        print(f"[train] no checkpoint in {run_dir}: starting from scratch", file=sys.stderr)

    # -- model, optimizer, engine (same seed on every rank: identical initial weights)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    import random

    random.seed(cfg.seed)
    model = Transformer(model_cfg)
    if cfg.init_from and ckpt is None:  # a resumed run continues from its checkpoint instead
        text = None
        if cfg.init_vocab == "map":
            text = TextTokenizer.load(tokenizer_dir(run_dir, cfg.tokenizers or None) / "text")
        how = init_from_hf(model, read_hf_folder(cfg.init_from), space, cfg.init_vocab, text)
        if rank == 0:
            print(f"[train] initialized from {cfg.init_from} ({how}); optimizer fresh", file=sys.stderr)
    optimizer = make_optimizer(model, cfg)
    schedule = WarmupCosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio, cfg.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if rank == 0:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
        if cfg.monitor == "wandb":  # wandb's own files (DeepSpeed's wandb section has no path)
            monitor_dir(cfg).mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_DIR", str(monitor_dir(cfg)))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if world == 1 and cfg.zero_stage == 0:
        # one process holds the whole gradient: DeepSpeed's bucketed all-reduce would only copy it
        # into flat buffers and back (~8 ms of a demo step on the 2-core CPU)
        engine.enable_backward_allreduce = False
    if cfg.compile:
        engine.compile()
    # dashboards: every metrics record also goes to DeepSpeed's monitor (rank 0 writes, others have none)
    sink = engine.monitor.write_events if rank == 0 and engine.monitor.enabled else None
    if isinstance(ds_config.get("wandb"), dict) and ds_config["wandb"].get("enabled"):
        # DeepSpeed logs its own lr at x = samples seen; wandb ignores any x below the last one, so
        # our x = step records would all be dropped. The step-indexed records alone go there (lr too).
        engine.monitor.enabled = False
    loader = PackedLoader(data, cfg.seq_len, cfg.micro_batch, rank, world, cfg.grad_accum, cfg.seed,
                          cfg.cond_dropout, lookahead=cfg.lookahead)
    mix = MixCounter(data)  # realized tokens per source / kind / modality, kept in the checkpoint meta
    if rank == 0:
        print("[train] " + format_plan(data.planned()), file=sys.stderr)
    val_loader = None
    if cfg.val_data and cfg.eval_every:
        val = TokenDataset(cfg.val_data)
        val.space.check_same(space, f"{cfg.val_data} vs {data.path}")
        val_loader = PackedLoader(val, cfg.seq_len, cfg.micro_batch, rank, world, seed=cfg.seed,
                                  shuffle=False, loop=False, lookahead=cfg.lookahead)

    # everything built so far lives for the whole run: keep it out of the cyclic GC's full passes,
    # which otherwise walk the model, optimizer and loader state every few hundred steps
    gc.freeze()
    step, skipped_total, tokens_seen, spent = 0, 0, 0, 0.0
    total = cfg.steps  # the last step: cfg.steps, or fewer when max_minutes cuts the run
    if ckpt is not None:
        meta, rank_state = load_checkpoint(engine, ckpt[1], rank)
        step, skipped_total, tokens_seen = meta["step"], meta.get("skipped_total", 0), meta.get("tokens_seen", 0)
        spent = float(meta.get("train_seconds", 0.0))
        if cfg.max_minutes and meta.get("budget_steps"):
            total = max(step, min(cfg.steps, int(meta["budget_steps"])))
            schedule.total = total
        loader.load_state_dict(meta["loader"])
        mix.load_state_dict(meta.get("mix"))
        # the schedule follows the current config (e.g. more steps), not the saved one
        scheduler.lr_lambdas[0].__dict__.update(schedule.__dict__)
        scheduler._last_lr = [base * schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
        for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
            group["lr"] = lr
        if rank_state.get("rng"):
            set_rng_state(rank_state["rng"])
        else:
            torch.manual_seed(cfg.seed + 1000 * step + rank)
        if rank == 0:
            print(f"[train] resumed from {ckpt[1]} (step {step})", file=sys.stderr)

    # -- MFU: model FLOPs per token over the peak of the devices. Attention is counted over the keys
    # document masking leaves (position in its document + 1 per token, this rank's last batch).
    peak = _peak_flops(cfg, cuda, bf16, world, dist, device)

    metrics = MetricsLog(run_dir / "metrics.jsonl", keep_until_step=step if ckpt else None, enabled=rank == 0,
                         sink=sink)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0, disable=rank != 0 or not cfg.progress)
    z_weight = model_cfg.z_loss_weight if cfg.z_loss_weight is None else cfg.z_loss_weight
    n_mod = len(MODALITY_NAMES)
    losses: dict[int, float] = {}
    nan_streak = 0
    last_saved = step
    tokens_per_step = cfg.micro_batch * cfg.seq_len * cfg.grad_accum * world
    engine.train()

    budget = StepBudget(started + cfg.max_minutes * 60.0 - spent, cfg.steps)
    tasks = _task_eval(cfg, engine.module, run_dir) if cfg.task_eval_every and rank == 0 else None
    if tasks is not None and step == 0:  # where the curve starts: the untrained model
        metrics.write({"step": 0, "minutes": 0.0, "tasks": tasks()})
        budget.evaluated(tasks.seconds[-1], cfg.task_eval_every)

    def save(at_step: int) -> None:
        t0 = time.perf_counter()
        meta = {"loader": loader.state_dict(), "skipped_total": skipped_total, "tokens_seen": tokens_seen,
                "world_size": world, "seq_len": cfg.seq_len, "mix": mix.state_dict(),
                "train_seconds": spent + t0 - started,
                "budget_steps": total if cfg.max_minutes else None}
        save_checkpoint(engine, run_dir, at_step, {"rng": rng_state()}, meta, cfg.keep_last, rank, barrier)
        if rank == 0:
            write_mix_json(run_dir / "data_mix.json", data, mix, at_step)
        # what the run needs after its last step: one more save, the plots
        budget.reserve = (time.perf_counter() - t0) + 1.0 + budget.last_eval

    with StopFlag() as stop:
        while step < total:
            t0 = time.perf_counter()
            # on the device: ce, z-loss, per-modality CE sums, per-modality counts, budgeted last
            # step (rank 0's, others add 0), stop flag
            acc = torch.zeros(2 + 2 * n_mod + 2, dtype=torch.float64, device=device)
            skipped_before = engine.skipped_steps
            lr = scheduler.get_last_lr()[0]  # the lr this step's update uses
            for _ in range(cfg.grad_accum):
                batch = next(loader)
                mean_keys = float(batch["positions"].float().mean()) + 1.0
                ids = batch["ids"].to(device, non_blocking=True)  # [B, T]
                labels = batch["labels"].to(device, non_blocking=True)  # [B, T]
                logits = engine(ids, positions=batch["positions"].to(device), doc_ids=batch["doc_ids"].to(device))
                # The loss is the logits' last use: its backward may overwrite them with their
                # gradient instead of allocating another [B, T, V] buffer.
                out = lm_loss(logits, labels, batch["modality"].to(device), z_loss_weight=z_weight,
                              inplace_backward=True)
                loss = out.loss
                if not torch.isfinite(loss):
                    loss = loss * float("nan")  # NaN gradients everywhere: the update is skipped
                engine.backward(loss)
                engine.step()
                acc[:-2] += torch.cat([out.ce.detach()[None], out.z_loss.detach()[None],
                                       *(out.per_modality_sum[m].detach()[None] for m in MODALITY_NAMES),
                                       *(out.per_modality_count[m][None] for m in MODALITY_NAMES)]).double()
            acc[-1] = 1.0 if stop.signal else 0.0
            if rank == 0 and cfg.max_minutes:
                now = time.perf_counter()
                budget.step_done(step + 1, now)
                acc[-2] = budget.last_step(step + 1, now, total)
            if world > 1:  # one small all-reduce: losses of all ranks and whether any rank must stop
                dist.all_reduce(acc)
            acc = acc.cpu()
            # realized mix: this step's global rows s·G … (s+1)·G from the epoch plan (every rank
            # counts the same, whatever the process count) and all ranks' label tokens per modality
            mix.add_rows(loader.plan(loader.epoch), loader.consumed - loader.global_batch, loader.consumed)
            mix.add_labels({m: acc[2 + n_mod + i] for i, m in enumerate(MODALITY_NAMES)})
            # ZeRO counts overflow steps in the engine; at stage 0 our optimizer knows (under a
            # bf16 wrapper the engine does not see its flag)
            skipped = engine.skipped_steps - skipped_before or int(bool(getattr(optimizer, "overflow", False)))
            step += 1
            tokens_seen += tokens_per_step
            ce = float(acc[0]) / (cfg.grad_accum * world)
            if skipped:
                skipped_total += 1
                nan_streak += 1
            else:
                nan_streak = 0
                losses[step] = ce
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            if cfg.max_minutes and int(acc[-2]) > 0 and int(acc[-2]) != total:
                total = max(step, int(acc[-2]))
                schedule.total = scheduler.lr_lambdas[0].total = total
                bar.total = total
            if step % cfg.log_every == 0 or step == total or skipped:
                gn = engine.get_global_grad_norm()
                rec = {"step": step, "loss": ce, "z_loss": float(acc[1]) / (cfg.grad_accum * world),
                       "lr": lr, "grad_norm": None if gn is None else float(gn),
                       "tokens_per_s": tps,
                       "mfu": tps * flops_per_token(model_cfg, cfg.seq_len, keys=mean_keys) / peak if peak else None,
                       "step_time": dt, "tokens_seen": tokens_seen, "epoch": loader.epoch,
                       "skipped": bool(skipped), "skipped_total": skipped_total}
                for i, m in enumerate(MODALITY_NAMES):
                    cnt = float(acc[2 + n_mod + i])
                    if cnt > 0:
                        rec[f"loss_{m}"] = float(acc[2 + i]) / cnt
                metrics.write(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{ce:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            if nan_streak > cfg.max_nan_skips:
                metrics.close()
                bar.close()
                where = latest_checkpoint(run_dir)
                raise DivergedError(
                    f"loss was NaN/inf for {nan_streak} steps in a row (at step {step}); the run stopped. "
                    f"Last good checkpoint: {where[1] if where else 'none'}. Lower lr, raise warmup or "
                    f"check the data, then --resume")
            if val_loader is not None and step % cfg.eval_every == 0:
                metrics.write({"step": step, **_evaluate(engine, val_loader, cfg, device, z_weight, world, dist)})
            if cfg.task_eval_every and (step % cfg.task_eval_every == 0 or step == total):
                t_eval = time.perf_counter()
                if tasks is not None:  # rank 0 measures, the others wait
                    rec = tasks()
                    metrics.write({"step": step, "minutes": round((spent + time.perf_counter() - started) / 60, 3),
                                   "tasks": rec})
                    print_tasks(step, rec)
                barrier()
                budget.evaluated(time.perf_counter() - t_eval, cfg.task_eval_every)
            stopping = float(acc[-1]) > 0
            if (val_loader is not None and step % cfg.eval_every == 0) or step == total or stopping:
                metrics.write({"step": step, "mix": mix.record()})
            if step % cfg.checkpoint_every == 0 or step == total or stopping:
                save(step)
                last_saved = step
            if stopping:
                break
    bar.close()
    metrics.close()
    if last_saved != step:
        save(step)
    if rank == 0:
        write_mix_json(run_dir / "data_mix.json", data, mix, step)  # also when no step ran (resumed at the end)
        from .plot import plot_run

        plot_run(run_dir)
    interrupted = stop.signal if step < total else None
    if rank == 0 and total < cfg.steps:
        print(f"[train] max_minutes={cfg.max_minutes:g}: trained {total} of {cfg.steps} steps", file=sys.stderr)
    if rank == 0 and interrupted:
        print(f"[train] stopped at step {step} by {interrupted}; continue with --resume", file=sys.stderr)
    return TrainResult(step, losses, engine.module, run_dir, interrupted, skipped_total)


def _task_eval(cfg: TrainConfig, model, run_dir: Path):
    """The in-training task evaluator, with the tokenizer set the training data was prepared with."""
    from .export import tokenizer_dir
    from .task_eval import TaskEval

    if cfg.zero_stage == 3:
        raise UserError("task_eval_every needs the whole model in one process; it does not work with zero_stage=3")
    tok_dir = tokenizer_dir(run_dir, cfg.tokenizers or None)
    return TaskEval(model, tok_dir, cfg.task_eval_data, cfg.task_eval_limit, cfg.task_eval_tasks, seed=cfg.seed)


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, model_cfg, space, resuming: bool) -> None:
    from ..tokenizers.token_space import TokenSpace

    run_dir.mkdir(parents=True, exist_ok=True)
    if resuming:
        if (run_dir / "token_space.json").is_file():
            TokenSpace.load(run_dir).check_same(space, f"{run_dir} vs {' + '.join(s.path for s in parse_sources(cfg.data))}")
        if (run_dir / "model.yaml").is_file():
            import yaml

            before = yaml.safe_load((run_dir / "model.yaml").read_text())
            now = to_dict(model_cfg)
            diff = [k for k in now if before.get(k) != now[k] and k != "activation_checkpointing"]
            if diff:
                raise UserError(f"cannot resume {run_dir}: the model config changed ({', '.join(diff)})")
    save_config(cfg, run_dir / "config.yaml")
    save_config(model_cfg, run_dir / "model.yaml")
    space.save(run_dir / "token_space.json")


def _peak_flops(cfg: TrainConfig, cuda: bool, bf16: bool, world: int, dist, device) -> float | None:
    """Total peak FLOP/s of all ranks (the MFU denominator)."""

    from ..model import measure_cpu_matmul_peak, peak_flops

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


def _evaluate(engine, loader, cfg: TrainConfig, device, z_weight: float, world: int, dist) -> dict:
    """Val cross-entropy (overall and per modality) over the first `eval_batches` micro-batches."""

    from ..model import MODALITY_NAMES, lm_loss

    n_mod = len(MODALITY_NAMES)
    acc = torch.zeros(2 * n_mod, dtype=torch.float64, device=device)
    loader.epoch, loader.consumed = 0, 0
    engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= cfg.eval_batches:
                break
            logits = engine(batch["ids"].to(device), positions=batch["positions"].to(device),
                            doc_ids=batch["doc_ids"].to(device))
            out = lm_loss(logits, batch["labels"].to(device), batch["modality"].to(device), z_loss_weight=z_weight)
            acc += torch.cat([*(out.per_modality_sum[m][None] for m in MODALITY_NAMES),
                              *(out.per_modality_count[m][None] for m in MODALITY_NAMES)]).double()
    engine.train()
    if world > 1:
        dist.all_reduce(acc)
    acc = acc.cpu()
    total = float(acc[n_mod:].sum())
    rec = {"val_loss": float(acc[:n_mod].sum()) / total if total else None}
    for j, m in enumerate(MODALITY_NAMES):
        if acc[n_mod + j] > 0:
            rec[f"val_loss_{m}"] = float(acc[j] / acc[n_mod + j])
    return rec

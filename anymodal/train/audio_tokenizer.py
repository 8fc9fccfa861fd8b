"""Train the audio codec (`anymodal tokenizer train audio --config C [k=v ...] --out DIR [--resume]`).

Data: the speech segments of raw webdataset shards (default: the demo world, generated into
`OUT/world/` on first use). All clips are held in memory; each step draws `batch_size` random
crops of `crop_seconds`. Loss = mel (multi-scale) + time-domain L1 + commitment (+ multi-resolution
STFT when `loss.stft_weight` > 0), and after `loss.disc_start` an MS-STFT discriminator's hinge +
feature-matching losses. With `max_minutes` the wall clock is the budget: the LR cosine
(anymodal.train.schedule) ends with it. `Trainer` builds the codec and its losses and restores a
checkpoint; its `train_step` returns the step's `AudioStepStats`.

Writes into OUT:
    checkpoints/step_XXXXXXXX.pt  resumable state (model, optimizers, RNG, step, elapsed), atomic, last K kept
                                  (anymodal.train.checkpoint)
    metrics.jsonl                 one JSON line per logged step and per validation
    samples/                      example WAVs (original / reconstruction) and spectrogram PNGs
    loss.png                      training curves
    config.yaml + model.safetensors   the tokenizer (AudioTokenizer.load(OUT)); train_config.yaml
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import check_choice, load_config, save_config
from ..data.media import save_wav
from ..data.reader import RecordCounter, iter_audio
from ..data.world import generate_world
from ..errors import ConfigError, UserError
from ..tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from ..tokenizers.audio_losses import (
    MultiResSTFTLoss,
    MultiScaleMelLoss,
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    generator_losses,
)
from ..tokenizers.audio_metrics import evaluate_codec, spectrogram_png
from .checkpoint import CKPT_DIR, latest_checkpoint, load_state, rng_state, save_state, set_rng_state
from .cpu_memory import keep_freed_memory
from .metrics import MetricsLog
from .plot import plot_series
from .progress import ProgressBar
from .schedule import decay_progress, lr_factor


@dataclass
class AudioDataConfig:
    train: str = ""  # raw shards (path, glob, brace pattern, list); "" = the demo world's train split
    val: str = ""  # "" = the demo world's val split
    world_docs: int = 400  # documents per split when the demo world is generated
    max_train_clips: int = 0  # 0 = all speech clips found
    val_clips: int = 16
    crop_seconds: float = 1.0
    min_rms: float = 1e-3  # crops quieter than this are redrawn (silence teaches nothing)


@dataclass
class AudioLossConfig:
    mel_weight: float = 1.0
    mel_scales: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    mel_log_eps: float = 1e-2
    mel_linear_weight: float = 0.0
    l1_weight: float = 0.1
    stft_weight: float = 0.0  # multi-resolution STFT loss (spectral convergence + log magnitude)
    stft_scales: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    stft_log_eps: float = 1e-5  # floor of the STFT loss's log magnitude (1e-2: silence does not dominate)
    commit_weight: float = 1.0
    disc: bool = False
    disc_start: int = 0  # step from which the adversarial losses apply
    disc_channels: int = 16
    disc_scales: list[int] = field(default_factory=lambda: [1024, 512, 256])
    disc_lr: float = 3e-4
    adv_weight: float = 1.0
    feat_weight: float = 2.0


@dataclass
class AudioTrainConfig:
    model: AudioTokenizerConfig = field(default_factory=AudioTokenizerConfig)
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    loss: AudioLossConfig = field(default_factory=AudioLossConfig)
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.8, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    kmeans_batches: int = 4  # batches pooled for the k-means codebook init (more vectors than codes)
    log_every: int = 10
    val_every: int = 200
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    max_minutes: float = 0.0  # 0 = no wall-clock limit; otherwise stop early (and still save)
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0 = torch default

    def __post_init__(self) -> None:
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("config keys 'steps' and 'batch_size' must be >= 1")
        if self.data.crop_seconds * self.model.sample_rate < self.model.hop:
            raise ConfigError("data.crop_seconds is shorter than one codec frame")


# -----------------------------------------------------------------------------------------------
# data


def _world_dir(out: Path, cfg: AudioTrainConfig, split: str) -> str:
    """Generate the demo world's split under OUT/world/ (once) and return its shard glob."""
    d = out / "world" / split
    if not any(d.glob("*.tar")):
        # splits differ by construction (the world seeds each document with (seed, split, index))
        generate_world(str(d), split=split, docs=cfg.data.world_docs, seed=0, progress=False, require_audio=True)
    return str(d / "*.tar")


def load_speech(shards: str, sr: int, limit: int = 0) -> list[np.ndarray]:
    """Every audio segment of the raw shards as mono float32 at sr (corrupt records skipped)."""
    counter = RecordCounter()
    clips = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for item in iter_audio(shards, sample_rate=sr, counter=counter):
            wave = item if isinstance(item, np.ndarray) else _find_wave(item)
            if wave is not None and wave.size > 0:
                clips.append(np.asarray(wave, dtype=np.float32))
            if limit and len(clips) >= limit:
                break
    if not clips:
        raise UserError(f"no audio found in {shards} ({counter.report()})")
    return clips


def _find_wave(item) -> np.ndarray | None:
    """iter_audio may yield bare waves, (key, wave) pairs or documents: take the wave."""
    if isinstance(item, (tuple, list)):
        for x in item:
            if isinstance(x, np.ndarray):
                return x
    for name in ("audio", "wave"):
        if hasattr(item, name):
            return getattr(item, name)
    if hasattr(item, "segments"):
        for s in item.segments:
            if isinstance(s, dict) and "audio" in s:
                return s["audio"]
    return None


def get_clips(cfg: AudioTrainConfig, out: Path, split: str) -> list[np.ndarray]:
    sr = cfg.model.sample_rate
    shards = cfg.data.train if split == "train" else cfg.data.val
    limit = cfg.data.max_train_clips if split == "train" else cfg.data.val_clips
    return load_speech(shards or _world_dir(out, cfg, split), sr, limit)


class CropSampler:
    """Random fixed-length crops from in-memory clips, driven by its own (saved) torch Generator."""

    def __init__(self, clips: list[np.ndarray], length: int, min_rms: float, seed: int):
        self.clips = clips
        self.length = length
        self.min_rms = min_rms
        self.gen = torch.Generator().manual_seed(seed)

    def crop(self) -> np.ndarray:
        for _ in range(10):  # redraw silent crops a few times
            i = int(torch.randint(len(self.clips), (1,), generator=self.gen))
            c = self.clips[i]
            if c.size <= self.length:
                x = np.pad(c, (0, self.length - c.size))
            else:
                a = int(torch.randint(c.size - self.length + 1, (1,), generator=self.gen))
                x = c[a : a + self.length]
            if np.sqrt(np.mean(x**2)) >= self.min_rms:
                break
        return x

    def batch(self, n: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.crop() for _ in range(n)]))  # [n, length]


# -----------------------------------------------------------------------------------------------
# training


def lr_at(step: int, cfg: AudioTrainConfig, elapsed_s: float = 0.0) -> float:
    """The lr of step `step`: warmup, then cosine to min_lr_ratio. With `max_minutes` the cosine ends
    with whichever budget runs out first (steps or wall clock), so a time-boxed run still anneals fully."""
    progress = decay_progress(step, cfg.warmup_steps, cfg.steps, elapsed_s, cfg.max_minutes * 60)
    return cfg.lr * lr_factor(step, cfg.warmup_steps, progress, cfg.min_lr_ratio)


@dataclass
class AudioStepStats:
    """One training step: what its metrics.jsonl record holds (the optional terms when they apply)."""

    step: int  # the step done (1-based)
    mel: float
    l1: float
    commit: float
    stft: float | None  # with loss.stft_weight
    adv: float | None  # adversarial and feature-matching terms, from loss.disc_start
    feat: float | None
    disc: float | None  # the discriminator's loss
    loss: float  # the generator's total
    grad_norm: float  # before clipping
    lr: float

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Trainer:
    def __init__(self, cfg: AudioTrainConfig, out: Path, train_clips, val_clips):
        self.cfg = cfg
        self.out = out
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is available")
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if not use_cuda:
            # digital silence drives activations/gradients into denormals, which are ~10x slower on CPU
            torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)
        self.model = AudioTokenizer(cfg.model).to(self.device)
        self.mel_loss = MultiScaleMelLoss(
            cfg.model.sample_rate, cfg.loss.mel_scales, cfg.loss.mel_log_eps, cfg.loss.mel_linear_weight
        ).to(self.device)
        self.stft_loss = MultiResSTFTLoss(cfg.loss.stft_scales, log_eps=cfg.loss.stft_log_eps).to(self.device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.disc = None
        if cfg.loss.disc:
            self.disc = MultiScaleSTFTDiscriminator(cfg.loss.disc_scales, cfg.loss.disc_channels).to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.loss.disc_lr, betas=(0.5, 0.9))
        crop = int(cfg.data.crop_seconds * cfg.model.sample_rate) // cfg.model.hop * cfg.model.hop
        self.sampler = CropSampler(train_clips, crop, cfg.data.min_rms, cfg.seed)
        self.val_clips = val_clips
        self.step = 0
        self.elapsed_before = 0.0  # training seconds of earlier sessions (resume)
        self.start = time.time()
        self.history: dict[str, list[tuple[int, float]]] = {"loss": [], "mel": []}

    def elapsed(self) -> float:
        """Training wall-clock seconds so far, summed over resumed sessions."""
        return self.elapsed_before + time.time() - self.start

    def train_step(self) -> AudioStepStats:
        """One generator (and, from loss.disc_start, discriminator) update on a batch of random crops."""
        cfg = self.cfg
        self.model.train()
        x = self.sampler.batch(cfg.batch_size).to(self.device)  # [B, T]
        if self.step == 0 and cfg.model.kmeans_init:
            self._kmeans_init(x)
        lr = lr_at(self.step, cfg, self.elapsed())
        for g in self.opt.param_groups:
            g["lr"] = lr
        out = self.model(x)
        recon = out.recon[:, : x.shape[1]]  # [B, T]
        mel = self.mel_loss(recon, x)
        l1 = F.l1_loss(recon, x)
        loss = cfg.loss.mel_weight * mel + cfg.loss.l1_weight * l1 + cfg.loss.commit_weight * out.commit_loss
        stft = adv = feat = d_loss = None
        if cfg.loss.stft_weight:
            stft = self.stft_loss(recon, x)
            loss = loss + cfg.loss.stft_weight * stft
        use_disc = self.disc is not None and self.step >= cfg.loss.disc_start
        if use_disc:
            adv, feat = generator_losses(self.disc, x, recon)
            loss = loss + cfg.loss.adv_weight * adv + cfg.loss.feat_weight * feat
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        if use_disc:
            d_loss = discriminator_loss(self.disc, x, recon.detach())
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
        self.step += 1
        return AudioStepStats(step=self.step, mel=mel.item(), l1=l1.item(), commit=out.commit_loss.item(),
                              stft=_item(stft), adv=_item(adv), feat=_item(feat), disc=_item(d_loss),
                              loss=loss.item(), grad_norm=float(gnorm), lr=lr)

    @torch.no_grad()
    def _kmeans_init(self, first: torch.Tensor) -> None:
        """Init every level's codebook by k-means on several batches' latents (not one small batch)."""
        xs = [first] + [self.sampler.batch(self.cfg.batch_size).to(self.device) for _ in range(self.cfg.kmeans_batches - 1)]
        x = torch.cat(xs)  # [k*B, T]
        z = self.model.encoder(x.unsqueeze(1)).transpose(1, 2)  # [k*B, N, D]
        q = self.model.quantizer
        dropout, q.quantize_dropout = q.quantize_dropout, False  # every level sees data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.train()
            q(z)
        q.quantize_dropout = dropout

    def validate(self, final: bool = False) -> dict:
        self.model.eval()
        metrics = evaluate_codec(self.model, self.val_clips, with_stoi=True)
        metrics["step"] = self.step
        tag = "final" if final else f"step_{self.step:06d}"
        sdir = self.out / "samples"
        for i, wave in enumerate(self.val_clips[:2]):
            codes = self.model.encode(torch.from_numpy(wave)[None].to(self.device))
            recon = self.model.decode(codes)[0, : wave.size].cpu().numpy()
            save_wav(wave, self.cfg.model.sample_rate, sdir / f"{tag}_{i}_orig.wav")
            save_wav(recon, self.cfg.model.sample_rate, sdir / f"{tag}_{i}_recon.wav")
            spectrogram_png(wave, recon, sdir / f"{tag}_{i}_spec.png")
        self.model.train()
        return metrics

    # checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        s = {
            "step": self.step,
            "elapsed_s": self.elapsed(),
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": rng_state(),
            "sampler_rng": self.sampler.gen.get_state(),
            "history": {k: [list(p) for p in v] for k, v in self.history.items()},
        }
        if self.disc is not None:
            s["disc"] = self.disc.state_dict()
            s["disc_opt"] = self.disc_opt.state_dict()
        return s

    def save_checkpoint(self) -> Path:
        return save_state(self.out / CKPT_DIR, self.step, self.state(), self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        s = load_state(path, self.device)
        try:
            self.model.load_state_dict(s["model"])
            self.opt.load_state_dict(s["opt"])
            if self.disc is not None:
                if "disc" not in s:
                    raise KeyError("checkpoint has no discriminator (was loss.disc changed?)")
                self.disc.load_state_dict(s["disc"])
                self.disc_opt.load_state_dict(s["disc_opt"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"checkpoint {path} does not fit this config: {str(e).splitlines()[0]}") from None
        self.step = int(s["step"])
        self.elapsed_before = float(s.get("elapsed_s", 0.0))
        set_rng_state(s["rng"])
        self.sampler.gen.set_state(s["sampler_rng"].cpu())  # loaded onto the training device
        self.history = {k: [tuple(p) for p in v] for k, v in s.get("history", {}).items()} or self.history


def _item(x: torch.Tensor | None) -> float | None:
    return None if x is None else x.item()


def train(cfg: AudioTrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Trainer:
    """Train (or continue) a codec into `out`; returns the trainer (its model is the result)."""
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # CPU activations reuse their pages step after step (see cpu_memory)
    found = latest_checkpoint(out / CKPT_DIR)
    if resume and found is None:
        raise UserError(f"--resume given but {out / CKPT_DIR} holds no checkpoint")
    if not resume and found is not None:
        raise UserError(f"{out} already holds a training run; pass --resume to continue it or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    train_clips = get_clips(cfg, out, "train")
    val_clips = get_clips(cfg, out, "val")[: cfg.data.val_clips]
    trainer = Trainer(cfg, out, train_clips, val_clips)
    if found is not None:
        trainer.load_checkpoint(found[1])
    trainer.start = time.time()
    bar = ProgressBar(cfg.steps, trainer.step, "audio codec", cfg.max_minutes, trainer.elapsed(), disable=not progress)
    with MetricsLog(out / "metrics.jsonl", keep_until_step=trainer.step if found else None) as log:
        try:
            while trainer.step < cfg.steps:
                stats = trainer.train_step()
                trainer.history["loss"].append((stats.step, stats.loss))
                trainer.history["mel"].append((stats.step, stats.mel))
                bar.update(stats.step, trainer.elapsed(), mel=f"{stats.mel:.3f}")
                if stats.step % cfg.log_every == 0 or stats.step == cfg.steps:
                    log.write({**stats.record(), "elapsed_s": round(trainer.elapsed(), 1)})
                if cfg.val_every and stats.step % cfg.val_every == 0 and stats.step < cfg.steps:
                    log.write({"val": trainer.validate()})
                if cfg.ckpt_every and stats.step % cfg.ckpt_every == 0:
                    trainer.save_checkpoint()
                if cfg.max_minutes and trainer.elapsed() > cfg.max_minutes * 60:
                    bar.write(f"stopping at step {stats.step}: max_minutes={cfg.max_minutes} reached")
                    break
        finally:
            bar.close()
        trainer.save_checkpoint()
        final = trainer.validate(final=True)
        log.write({"val": final, "final": True})
    plot_series(trainer.history, out / "loss.png", title="audio codec training", ylabel="loss")
    trainer.model.eval().save(out)
    print(json.dumps({"out": str(out), **{k: final[k] for k in ("mel_distance", "si_snr_db", "stoi", "codebook_usage_min")}}))
    return trainer


def train_from_cli(config: str, overrides: list[str], out: str, resume: bool = False) -> None:
    cfg = load_config(AudioTrainConfig, config, overrides)
    train(cfg, out, resume=resume)

"""Audio tokenizer: a small SEANet-style convolutional codec with residual vector quantization.

    wave [B, T] at sample_rate
      -> encoder: conv(1 -> C), then per stride s: residual units, strided conv (C -> 2C, /s)
      -> latent [B, D, T / hop]                              hop = prod(strides), frame_rate = sr / hop
      -> ResidualVQ (n_q levels x K codes, k-means init, dead-code replacement, quantizer dropout)
      -> ids [B, frames, n_q]                                 frame-major, as the token stream wants
      -> decoder: mirror of the encoder with transposed convs (+ a full-rate output conv when
         `out_channels` > 0) -> wave [B, frames * hop]

Quantizer dropout during training (a random number of levels per batch, as SoundStream) is what
lets `decode` take ids with fewer than `n_q` levels: the missing finer levels simply add nothing.

Long inputs are encoded and decoded in chunks that overlap by the receptive field, so the result
equals a single pass (checked by the tests) while memory stays bounded. On the CPU the encoder runs
as `audio_cpu.encode_latents` (the same function as matrix products, without oneDNN's per-length
set-up), and `encode_clips` encodes many clips with one quantizer call.

File helpers for the CLI: `encode_file(tok_dir, in_audio, out_json)` and
`decode_file(tok_dir, in_json, out_wav)`; audio files are read and written by the one audio path,
`anymodal.data.media` (`read_audio_file`, `save_wav`). A tokenizer dir holds `config.yaml` +
`model.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from vector_quantize_pytorch import ResidualVQ

from ..config import check_choice, load_config, save_config
from ..data.media import read_audio_file, save_wav
from ..errors import ConfigError, UserError
from ..fileio import atomic_path, write_atomic

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class AudioTokenizerConfig:
    sample_rate: int = 16000
    channels: int = 16  # width of the first (full-rate) conv; doubled after each downsampling
    max_channels: int = 256  # cap on the doubling
    strides: list[int] = field(default_factory=lambda: [4, 4, 4, 5])  # hop = prod -> 320 = 50 Hz at 16 kHz
    res_dilations: list[int] = field(default_factory=lambda: [1, 3])  # residual units per stage
    plain_stages: int = 1  # the first (highest-rate, costliest) stages have no residual units
    kernel_size: int = 7  # first and last conv
    stem: bool = True  # a full-rate conv first/last; False: the first strided conv reads the wave directly
    # stem=False only: the decoder's last upsampling writes `out_channels` channels and a full-rate
    # conv (kernel_size) makes the wave; 0 = the transposed conv writes the wave itself (cheaper, but
    # leaves a tone at sample_rate / last stride from its periodic output pattern)
    out_channels: int = 0
    latent_dim: int = 64  # D, the vector quantized at each frame
    activation: str = "elu"
    # quantizer
    n_q: int = 4
    codebook_size: int = 1024
    codebook_dim: int = 0  # 0 = latent_dim; smaller projects down before quantizing (shared in/out proj)
    kmeans_init: bool = True
    kmeans_iters: int = 10
    ema_decay: float = 0.95
    dead_code_threshold: float = 0.5  # EMA usage below this (codes per batch) -> replaced by a batch vector
    quantizer_dropout: bool = True
    # Levels the LM token stream carries, the coarsest first (0 = all n_q). The first level holds
    # most of what is said; each finer level adds frame_rate tokens per second that refine the
    # sound. The decoder renders fewer levels as it does any prefix of them.
    stream_levels: int = 0
    # inference
    chunk_seconds: float = 20.0  # encode/decode longer inputs in overlapping chunks of this length

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, ("elu", "gelu", "silu", "lrelu"))
        if not self.strides or any(int(s) < 1 for s in self.strides):
            raise ConfigError(f"config key 'strides' must be a non-empty list of positive ints, got {self.strides}")
        if self.n_q < 1 or self.codebook_size < 2:
            raise ConfigError("config keys 'n_q' >= 1 and 'codebook_size' >= 2 are required")
        if not 0 <= self.stream_levels <= self.n_q:
            raise ConfigError(f"config key 'stream_levels' must be 0 (all) to n_q={self.n_q}, got {self.stream_levels}")
        if self.sample_rate % self.hop != 0:
            # a fractional frame rate would make the token stream's timing ambiguous
            raise ConfigError(f"sample_rate {self.sample_rate} is not a multiple of hop {self.hop} (prod of strides)")
        if not self.stem and self.plain_stages < 1:
            raise ConfigError("config key 'stem: false' needs 'plain_stages' >= 1 (the wave has one channel)")
        if self.channels < 1 or self.latent_dim < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError("config keys 'channels', 'latent_dim' must be >= 1 and 'kernel_size' odd")
        if self.out_channels < 0:
            raise ConfigError("config key 'out_channels' must be >= 0")
        if self.chunk_seconds <= 0:
            raise ConfigError("config key 'chunk_seconds' must be > 0")

    @property
    def hop(self) -> int:
        return int(math.prod(self.strides))

    @property
    def frame_rate(self) -> int:
        return self.sample_rate // self.hop


def elu_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ELU (alpha 1) of x written into `out` (same shape, not overlapping x): max(exp(min(x, 0)) - 1, x).
    exp(x) - 1 >= x, so the max is x where x > 0 and exp(x) - 1 elsewhere (and x itself next to 0,
    where rounding puts exp(x) - 1 below x: closer to expm1 there); `torch.where` costs 4x more."""
    torch.clamp(x, max=0, out=out).exp_().sub_(1)
    return torch.maximum(out, x, out=out)


class _ELUFunction(torch.autograd.Function):
    """ELU (alpha 1) with its negative side as exp(x) - 1; the gradient from the output alone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = elu_into(x, torch.empty_like(x))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return g * (y.clamp(max=0) + 1)  # 1 where x > 0, exp(x) = y + 1 elsewhere


class ELU(nn.Module):
    """`nn.ELU()` on the CPU in an eighth of the time: PyTorch's CPU `expm1` is not vectorized (about
    ten times slower than `exp`), and ELU was two thirds of the codec encoder's time (the
    activations run at the full 4 kHz of the first stage). exp(x) - 1 differs from expm1(x) by at most
    about 1e-7 (absolute) for x <= 0; the codes prepare writes agree with `nn.ELU`'s (tests)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ELUFunction.apply(x)


def _act(name: str) -> nn.Module:
    if name == "lrelu":
        return nn.LeakyReLU(0.1)
    return {"elu": ELU, "gelu": nn.GELU, "silu": nn.SiLU}[name]()


# -----------------------------------------------------------------------------------------------
# building blocks


class ResUnit(nn.Module):
    """x + conv1(act(conv3_dilated(act(x)))) with a channel bottleneck (SEANet's residual unit)."""

    def __init__(self, ch: int, dilation: int, act: str):
        super().__init__()
        self.block = nn.Sequential(
            _act(act),
            nn.Conv1d(ch, max(ch // 2, 1), 3, dilation=dilation, padding=dilation),
            _act(act),
            nn.Conv1d(max(ch // 2, 1), ch, 1),
        )

    def forward(self, x):  # x [B, C, T]
        return x + self.block(x)


def _stage_channels(cfg: AudioTokenizerConfig) -> list[int]:
    """Channels before each downsampling stage and at the bottom: C, 2C, 4C, ... (capped)."""
    return [min(cfg.channels * 2**i, cfg.max_channels) for i in range(len(cfg.strides) + 1)]


class Encoder(nn.Module):
    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        chs = _stage_channels(cfg)
        k = cfg.kernel_size
        # without a stem the first strided conv is a learned filterbank on the raw wave (cheap on CPU)
        layers: list[nn.Module] = [nn.Conv1d(1, chs[0], k, padding=k // 2)] if cfg.stem else []
        for i, s in enumerate(cfg.strides):
            if i >= cfg.plain_stages:
                layers += [ResUnit(chs[i], d, cfg.activation) for d in cfg.res_dilations]
            if layers:
                layers.append(_act(cfg.activation))
            # kernel 2s, padding ceil(s/2): exactly T/s outputs for T a multiple of s
            c_in = chs[i] if layers else 1
            layers.append(nn.Conv1d(c_in, chs[i + 1], 2 * s, stride=s, padding=(s + 1) // 2))
        layers += [_act(cfg.activation), nn.Conv1d(chs[-1], cfg.latent_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # x [B, 1, T] -> [B, D, T / hop]
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        chs = _stage_channels(cfg)
        k = cfg.kernel_size
        layers: list[nn.Module] = [nn.Conv1d(cfg.latent_dim, chs[-1], k, padding=k // 2)]
        for i in reversed(range(len(cfg.strides))):
            s = cfg.strides[i]
            # kernel 2s, padding ceil(s/2), output_padding s%2: exactly L*s outputs
            c_out = chs[i] if (cfg.stem or i > 0) else (cfg.out_channels or 1)
            layers += [
                _act(cfg.activation),
                nn.ConvTranspose1d(chs[i + 1], c_out, 2 * s, stride=s, padding=(s + 1) // 2, output_padding=s % 2),
            ]
            if i >= cfg.plain_stages:
                layers += [ResUnit(chs[i], d, cfg.activation) for d in cfg.res_dilations]
        if cfg.stem:
            layers += [_act(cfg.activation), nn.Conv1d(chs[0], 1, k, padding=k // 2)]
        elif cfg.out_channels:
            layers += [_act(cfg.activation), nn.Conv1d(cfg.out_channels, 1, k, padding=k // 2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # z [B, D, N] -> [B, 1, N * hop]
        return self.net(z)


def _receptive_field(cfg: AudioTokenizerConfig) -> int:
    """Receptive field of the encoder in samples (the decoder mirrors it, in frames)."""
    rf, jump = cfg.kernel_size, 1
    for i, s in enumerate(cfg.strides):
        for d in cfg.res_dilations if i >= cfg.plain_stages else []:
            rf += 2 * d * jump
        rf += (2 * s - 1) * jump
        jump *= s
    return rf + 2 * jump + cfg.kernel_size  # + the decoder's full-rate output conv, if any


@dataclass
class CodecOutput:
    recon: torch.Tensor  # [B, T_padded]
    codes: torch.Tensor  # [B, frames, n_q]
    commit_loss: torch.Tensor  # scalar


# -----------------------------------------------------------------------------------------------
# the tokenizer


class AudioTokenizer(nn.Module):
    """Waveform <-> ids [B, frames, n_q]. `forward` is the training path (EMA codebook updates)."""

    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()

        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = ResidualVQ(
            dim=cfg.latent_dim,
            num_quantizers=cfg.n_q,
            codebook_size=cfg.codebook_size,
            codebook_dim=cfg.codebook_dim or None,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            decay=cfg.ema_decay,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            quantize_dropout=cfg.quantizer_dropout,
            commitment_weight=1.0,  # the trainer weights it
        )
        # context (in frames) each chunk needs on both sides so chunked == single pass
        self.context_frames = math.ceil(_receptive_field(cfg) / cfg.hop) + cfg.kernel_size + 2

    # properties the token space and the stream rely on
    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.cfg.frame_rate

    @property
    def hop(self) -> int:
        return self.cfg.hop

    @property
    def n_q(self) -> int:
        return self.cfg.n_q

    @property
    def stream_levels(self) -> int:
        """Levels per frame in the token stream (`cfg.stream_levels`, or all n_q)."""
        return self.cfg.stream_levels or self.cfg.n_q

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def chunk_frames(self) -> int:
        """Frames a chunk of a long input holds (`chunk_seconds`)."""
        return max(1, int(self.cfg.chunk_seconds * self.frame_rate))

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.hop)

    def _pad(self, wave: torch.Tensor) -> torch.Tensor:
        """Zero-pad [B, T] at the end to a whole number of frames."""
        t = wave.shape[-1]
        return F.pad(wave, (0, self.num_frames(t) * self.hop - t))

    # training path ------------------------------------------------------------------------------
    def forward(self, wave: torch.Tensor) -> CodecOutput:
        x = self._pad(wave).unsqueeze(1)  # [B, 1, T]
        z = self.encoder(x).transpose(1, 2)  # [B, N, D]
        zq, codes, commit = self.quantizer(z)  # [B, N, D], [B, N, n_q] (-1 where dropped), [n_q]
        recon = self.decoder(zq.transpose(1, 2)).squeeze(1)  # [B, N * hop]
        return CodecOutput(recon=recon, codes=codes, commit_loss=commit.sum())

    # inference ----------------------------------------------------------------------------------
    def _chunks(self, n_frames: int):
        """(start, end, ctx_start, ctx_end) frame ranges covering [0, n_frames)."""
        chunk = self.chunk_frames
        ctx = self.context_frames
        for a in range(0, n_frames, chunk):
            b = min(a + chunk, n_frames)
            yield a, b, max(0, a - ctx), min(n_frames, b + ctx)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N * hop] -> the encoder's latents, frame-major [B, N, D]."""
        x = x.unsqueeze(1)  # [B, 1, N * hop]
        if x.device.type == "cpu":
            from .audio_cpu import encode_latents  # the same function without oneDNN's per-length set-up

            return encode_latents(self.encoder, x)
        return self.encoder(x).transpose(1, 2)

    def _quantize(self, z: torch.Tensor, levels: int) -> torch.Tensor:
        """Latents [B, N, D] -> ids [B, N, levels], quantizer in eval mode (no EMA update, no
        dropout). Residual levels are sequential, so the first `levels` come out the same without
        computing the finer ones. Each frame is quantized on its own."""
        rvq = self.quantizer
        all_layers = rvq.layers
        was = rvq.training
        books = [layer._codebook for layer in all_layers]
        initted = [b.initted.clone() for b in books]
        if was:
            rvq.eval()
        try:
            # a level that never saw training data must not be k-means-initialised here (that would
            # make encoding depend on the input): it keeps its (zero) codebook
            for b in books:
                b.initted.fill_(True)
            if levels < len(all_layers):
                rvq.layers = nn.ModuleList(all_layers[:levels])
            _, codes, _ = rvq(z)
        finally:
            rvq.layers = all_layers
            if was:
                rvq.train()
            for b, flag in zip(books, initted):
                b.initted.copy_(flag)
        return codes

    @torch.no_grad()
    def _encode_frames(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """x [B, N * hop] -> ids [B, N, levels]."""
        return self._quantize(self._latents(x), levels)

    @torch.no_grad()
    def encode(self, wave: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """wave float [B, T] at sample_rate -> LongTensor [B, ceil(T / hop), levels or n_q]."""
        if wave.dim() != 2:
            raise ValueError(f"encode expects a wave [B, T], got shape {tuple(wave.shape)}")
        levels = self.n_q if levels is None else levels
        if not 1 <= levels <= self.n_q:
            raise ValueError(f"levels must be 1..{self.n_q}, got {levels}")
        x = self._pad(wave.float().to(self.device))  # [B, N * hop]
        n = x.shape[-1] // self.hop
        if n == 0:
            return torch.zeros(wave.shape[0], 0, levels, dtype=torch.long, device=wave.device)
        out = []
        for a, b, ca, cb in self._chunks(n):
            codes = self._encode_frames(x[:, ca * self.hop : cb * self.hop], levels)  # [B, cb - ca, levels]
            out.append(codes[:, a - ca : b - ca])
        return torch.cat(out, dim=1).long()

    def encode_stream(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [B, T] -> the codes the token stream carries: [B, frames, stream_levels]."""
        return self.encode(wave, self.stream_levels)

    @torch.no_grad()
    def encode_clips(self, waves: list, levels: int | None = None, batch: int = 32) -> list[torch.Tensor]:
        """Many clips (float arrays [T], any lengths) -> ids [frames, levels or n_q] each, in order,
        equal to what `encode` gives each clip alone.

        The encoder runs on clips of one frame count together (up to `batch`; on the CPU it takes
        them one by one anyway): padding a clip to a longer one would change its last frames'
        codes. The quantizer, which looks at each frame alone, runs once over all the clips'
        frames: per call it costs more than a short clip's frames. Clips longer than a chunk
        (`chunk_seconds`) go through `encode`, chunk by chunk."""
        levels = self.n_q if levels is None else levels
        out: list[torch.Tensor | None] = [None] * len(waves)
        by_frames: dict[int, list[int]] = {}
        long = []
        for i, w in enumerate(waves):
            frames = self.num_frames(len(w))
            if frames > self.chunk_frames:
                long.append(i)
            elif frames == 0:
                out[i] = torch.zeros(0, levels, dtype=torch.long)
            else:
                by_frames.setdefault(frames, []).append(i)
        latents, order = [], []
        for frames, members in by_frames.items():
            for s in range(0, len(members), batch):
                group = members[s : s + batch]
                x = torch.zeros(len(group), frames * self.hop)  # [B, frames * hop]
                for row, i in enumerate(group):
                    x[row, : len(waves[i])] = torch.as_tensor(waves[i], dtype=torch.float32)
                latents.extend(self._latents(x.to(self.device)))  # [frames, D] each
                order.extend(group)
        if latents:
            codes = self._quantize(torch.cat(latents)[None], levels)[0].long().cpu()  # [all frames, levels]
            for i, c in zip(order, codes.split([len(z) for z in latents])):
                out[i] = c
        for i in long:
            wave = torch.as_tensor(waves[i], dtype=torch.float32)[None]
            out[i] = self.encode(wave, levels)[0].cpu()
        return out  # type: ignore[return-value]

    def codes_to_latent(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, N, k <= n_q] -> quantized latent [B, N, D]: sum of the first k levels' code vectors."""
        books = self.quantizer.codebooks  # [n_q, K, d]
        zq = 0
        for level in range(ids.shape[-1]):
            zq = zq + books[level][ids[..., level]]  # [B, N, d]
        zq = self.quantizer.project_out(zq)  # [B, N, D]
        return zq

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 3 or not (1 <= ids.shape[-1] <= self.n_q):
            raise UserError(f"audio ids must have shape [B, frames, 1..{self.n_q}], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise UserError(
                f"audio ids out of range: found {int(ids.min())}..{int(ids.max())}, valid 0..{self.codebook_size - 1}"
            )

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, frames, k] (k <= n_q; missing finer levels contribute nothing) -> wave [B, frames * hop]."""
        ids = torch.as_tensor(ids).long()
        self.check_ids(ids)
        n = ids.shape[1]
        if n == 0:
            return torch.zeros(ids.shape[0], 0, device=ids.device)
        out = []
        for a, b, ca, cb in self._chunks(n):
            zq = self.codes_to_latent(ids[:, ca:cb].to(self.device))  # [B, cb - ca, D]
            wave = self.decoder(zq.transpose(1, 2)).squeeze(1)  # [B, (cb - ca) * hop]
            out.append(wave[:, (a - ca) * self.hop : (b - ca) * self.hop])
        return torch.cat(out, dim=1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # save / load --------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """Write `config.yaml` + `model.safetensors` (atomically)."""

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, out / "config.yaml", extra={"kind": "audio"})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp))

    @classmethod
    def load(cls, tok_dir: str | Path, device: str | torch.device = "cpu") -> AudioTokenizer:
        d = Path(tok_dir)
        if not (d / "config.yaml").is_file() or not (d / "model.safetensors").is_file():
            raise UserError(f"{d} is not an audio tokenizer dir (needs config.yaml and model.safetensors)")

        data = yaml.safe_load((d / "config.yaml").read_text()) or {}
        kind = data.pop("kind", "audio")
        if kind != "audio":
            raise UserError(f"{d} holds a {kind} tokenizer, not an audio one")
        cfg = load_config(AudioTokenizerConfig, data=data)
        model = cls(cfg)
        try:
            state = load_file(str(d / "model.safetensors"))
            model.load_state_dict(state)
        except Exception as e:  # corrupt file or weights of another shape
            raise UserError(f"cannot load {d / 'model.safetensors'}: {str(e).splitlines()[0]}") from None
        return model.to(device).eval()


# -----------------------------------------------------------------------------------------------
# audio files: read and written by the data layer's one audio path (anymodal.data.media)


def encode_file(tok_dir: str | Path, in_audio: str | Path, out_json: str | Path) -> None:
    """Audio file -> JSON {"codes": [[l0..l_{n_q-1}] per frame], "num_samples", "sample_rate", ...}."""
    tok = AudioTokenizer.load(tok_dir)
    wave = read_audio_file(in_audio, tok.sample_rate)  # mono float32 at the codec rate, never empty
    codes = tok.encode(torch.from_numpy(wave)[None])[0]  # [N, n_q]
    doc = {
        "kind": "audio",
        "sample_rate": tok.sample_rate,
        "frame_rate": tok.frame_rate,
        "n_q": tok.n_q,
        "codebook_size": tok.codebook_size,
        "num_samples": int(wave.size),
        "codes": codes.tolist(),
    }
    write_atomic(out_json, json.dumps(doc, separators=(",", ":")))


def decode_file(tok_dir: str | Path, in_json: str | Path, out_wav: str | Path) -> None:
    """JSON from `encode_file` (or a bare [[...], ...] list of frames) -> 16-bit WAV at sample_rate."""
    tok = AudioTokenizer.load(tok_dir)
    p = Path(in_json)
    if not p.is_file():
        raise UserError(f"codes file not found: {p}")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{p} is not a JSON codes file") from None
    codes = doc.get("codes") if isinstance(doc, dict) else doc
    if not isinstance(codes, list) or not codes:
        raise UserError(f"{p} has no 'codes' list of frames")
    try:
        ids = torch.tensor(codes, dtype=torch.long)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{p}: 'codes' must be a rectangular list of integer frames") from None
    if ids.dim() != 2:
        raise UserError(f"{p}: 'codes' must be a list of frames, each a list of 1..{tok.n_q} level codes")
    if isinstance(doc, dict) and doc.get("sample_rate", tok.sample_rate) != tok.sample_rate:
        raise UserError(f"{p} was encoded at {doc['sample_rate']} Hz but the tokenizer runs at {tok.sample_rate} Hz")
    wave = tok.decode(ids[None])[0].cpu().numpy()  # [N * hop]
    n = doc.get("num_samples") if isinstance(doc, dict) else None
    if isinstance(n, int) and 0 < n <= wave.size:
        wave = wave[:n]  # drop the padding of the last frame
    save_wav(wave, tok.sample_rate, out_wav)

"""Codec quality figures (the audio tokenizer figures of docs/world.md) and a spectrogram picture.

- `si_snr(ref, est)`: scale-invariant SNR in dB.
- `mel_distance(ref, est, sr)`: mean L1 between log-mel spectrograms (80 bands, 1024-point FFT,
  log(mel + 0.01): ~85 dB below loud speech, so digital silence does not dominate).
- `stoi(ref, est, sr)`: short-time objective intelligibility (pystoi), 0..1.
- `codebook_usage(codes, K)`: per level, the share of the K codes used at least once.
- `evaluate_codec(tok, clips)`: all of the above over a list of waves, plus tokens per second.
- `spectrogram_png(orig, recon, sr, path)`: original over reconstruction, PIL only (no matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio
from PIL import Image
from pystoi import stoi as _stoi

from ..fileio import atomic_path


def si_snr(ref: np.ndarray, est: np.ndarray, eps: float = 1e-8) -> float:
    ref = ref - ref.mean()
    est = est - est.mean()
    target = (est @ ref) / (ref @ ref + eps) * ref  # projection of est on ref
    noise = est - target
    return float(10 * np.log10((target @ target + eps) / (noise @ noise + eps)))


_MEL_CACHE: dict[int, torch.nn.Module] = {}


def log_mel(wave: np.ndarray, sr: int) -> np.ndarray:
    """[T] -> log-magnitude mel [80, frames] (1024-point FFT, hop 256)."""

    if sr not in _MEL_CACHE:
        _MEL_CACHE[sr] = torchaudio.transforms.MelSpectrogram(sr, n_fft=1024, hop_length=256, n_mels=80, power=1.0)
    with torch.no_grad():
        m = _MEL_CACHE[sr](torch.as_tensor(wave, dtype=torch.float32))
    return torch.log(m + 1e-2).numpy()


def mel_distance(ref: np.ndarray, est: np.ndarray, sr: int) -> float:
    return float(np.abs(log_mel(ref, sr) - log_mel(est, sr)).mean())


def stoi(ref: np.ndarray, est: np.ndarray, sr: int) -> float:
    return float(_stoi(ref.astype(np.float64), est.astype(np.float64), sr, extended=False))


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[float]:
    """codes [N, n_q] -> per level, fraction of codes used at least once."""
    return [len(np.unique(codes[:, q])) / codebook_size for q in range(codes.shape[1])]


def evaluate_codec(tok, clips: list[np.ndarray], with_stoi: bool = True, levels: int | None = None) -> dict:
    """Round-trip every clip through `tok` (eval mode) and average the figures."""
    sr = tok.sample_rate
    all_codes, mels, snrs, stois = [], [], [], []
    for wave in clips:
        codes = tok.encode(torch.as_tensor(wave, dtype=torch.float32, device=tok.device)[None])  # [1, N, n_q]
        if levels is not None:
            codes = codes[..., :levels]
        recon = tok.decode(codes)[0, : wave.size].cpu().numpy()
        all_codes.append(codes[0].cpu().numpy())
        mels.append(mel_distance(wave, recon, sr))
        snrs.append(si_snr(wave, recon))
        if with_stoi:
            stois.append(stoi(wave, recon, sr))
    codes = np.concatenate(all_codes, axis=0)
    usage = codebook_usage(codes, tok.codebook_size)
    out = {
        "clips": len(clips),
        "seconds": float(sum(c.size for c in clips) / sr),
        "mel_distance": float(np.mean(mels)),
        "si_snr_db": float(np.mean(snrs)),
        "codebook_usage": [round(u, 4) for u in usage],
        "codebook_usage_min": float(min(usage)),
        "tokens_per_second": tok.frame_rate * codes.shape[1],
    }
    if with_stoi:
        out["stoi"] = float(np.mean(stois))
    return out


def _spec_image(wave: np.ndarray, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """Log-magnitude spectrogram as uint8 [freq (low at bottom), frames]."""
    w = torch.as_tensor(wave, dtype=torch.float32)
    if w.numel() < n_fft:
        w = torch.nn.functional.pad(w, (0, n_fft - w.numel()))
    s = torch.stft(w, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    db = 20 * torch.log10(s + 1e-5)
    db = (db - (db.max() - 80)).clamp(min=0) / 80  # 80 dB range
    return (db.flip(0).numpy() * 255).astype(np.uint8)


def spectrogram_png(orig: np.ndarray, recon: np.ndarray, path: str | Path, title_px: int = 4) -> None:
    """Original (top) and reconstruction (bottom) spectrograms in one PNG, 'magma'-like colours."""

    a, b = _spec_image(orig), _spec_image(recon)
    width = max(a.shape[1], b.shape[1])
    sep = np.full((title_px, width), 255, np.uint8)
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    grey = np.concatenate([pad(a), sep, pad(b)], axis=0)
    # simple colour map: black -> purple -> orange -> yellow
    t = grey.astype(np.float32) / 255
    rgb = np.stack([np.clip(1.6 * t, 0, 1), np.clip(1.8 * t - 0.6, 0, 1), np.clip(0.8 * np.sin(np.pi * t) + (t > 0.9) * t, 0, 1)], -1)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    if img.width > 1600:
        img = img.resize((1600, img.height))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")

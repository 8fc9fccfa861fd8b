"""Losses for training the audio codec.

- `MultiScaleMelLoss`: L1 between log-mel (and linear-mel) spectrograms at several FFT sizes, the
  reconstruction loss that matters most for intelligibility (STOI lives in band envelopes).
- `MultiScaleSTFTDiscriminator` (EnCodec's MS-STFTD): 2-D convs over the complex STFT at several
  resolutions; hinge adversarial losses and relative feature matching, switched on after a step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio


class MultiScaleMelLoss(nn.Module):
    def __init__(self, sample_rate: int, n_ffts: list[int], log_eps: float = 1e-2, linear_weight: float = 0.0):
        super().__init__()

        # eps ~85 dB below loud speech: digital silence (espeak pads with exact zeros) must not
        # dominate the loss by asking for log(0)
        self.log_eps = log_eps
        self.linear_weight = linear_weight
        self.mels = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate,
                n_fft=n,
                hop_length=n // 4,
                n_mels=min(80, n // 8),  # fewer bands at small FFTs (no empty mel filters)
                power=1.0,
                center=True,
            )
            for n in n_ffts
        )

    def forward(self, est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """est, ref [B, T] -> scalar: mean over scales of L1(log mel) + linear_weight * L1(mel)."""
        total = est.new_zeros(())
        for mel in self.mels:
            me, mr = mel(est), mel(ref)  # [B, n_mels, frames]
            total = total + F.l1_loss(torch.log(me + self.log_eps), torch.log(mr + self.log_eps))
            if self.linear_weight:
                total = total + self.linear_weight * F.l1_loss(me, mr)
        return total / len(self.mels)


class MultiResSTFTLoss(nn.Module):
    """Parallel-WaveGAN's multi-resolution STFT loss: spectral convergence (linear magnitude, so loud
    harmonics dominate, as they do in STOI's band envelopes) + L1 of log magnitude, averaged over
    FFT sizes. Finer frequency resolution than the mel loss: it penalises blurred harmonics.

    `log_eps` floors the log magnitude (default: `eps`). The tiny default lets digital silence and
    near-empty bins dominate the log term (log(1e-5) vs the codec's noise floor); 1e-2, like the
    mel loss, keeps the log term on audible structure."""

    def __init__(self, n_ffts: list[int], eps: float = 1e-5, log_eps: float | None = None):
        super().__init__()
        self.n_ffts = list(n_ffts)
        self.eps = eps
        self.log_eps = eps if log_eps is None else log_eps
        for n in self.n_ffts:
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def forward(self, est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """est, ref [B, T] -> scalar."""
        total = est.new_zeros(())
        for n in self.n_ffts:
            win = getattr(self, f"win{n}")
            se = torch.stft(est, n, n // 4, window=win, return_complex=True).abs()  # [B, F, frames]
            sr = torch.stft(ref, n, n // 4, window=win, return_complex=True).abs()
            sc = torch.linalg.vector_norm(sr - se) / (torch.linalg.vector_norm(sr) + self.eps)
            logmag = F.l1_loss(torch.log(se + self.log_eps), torch.log(sr + self.log_eps))
            total = total + sc + logmag
        return total / max(len(self.n_ffts), 1)


class STFTDiscriminator(nn.Module):
    """One resolution: [B, T] -> (logits [B, 1, t, f], feature maps)."""

    def __init__(self, n_fft: int, channels: int):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        c = channels
        # time axis first, frequency second; stride 2 along frequency, growing dilation along time
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(2, c, (3, 9), padding=(1, 4)),
                nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(1, 1), padding=(1, 4)),
                nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(2, 1), padding=(2, 4)),
                nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(4, 1), padding=(4, 4)),
                nn.Conv2d(c, c, (3, 3), padding=(1, 1)),
            ]
        )
        self.out = nn.Conv2d(c, 1, (3, 3), padding=(1, 1))

    def forward(self, x: torch.Tensor):
        spec = torch.stft(x, self.n_fft, self.n_fft // 4, window=self.window, return_complex=True)  # [B, F, t]
        h = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2, t, F]
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.out(h), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, n_ffts: list[int], channels: int):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, channels) for n in n_ffts)

    def forward(self, x: torch.Tensor):
        """x [B, T] -> list of (logits, feats) per resolution."""
        return [d(x) for d in self.discs]


def discriminator_loss(disc: MultiScaleSTFTDiscriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator (fake is detached by the caller)."""
    loss = real.new_zeros(())
    for (lr, _), (lf, _) in zip(disc(real), disc(fake)):
        loss = loss + F.relu(1 - lr).mean() + F.relu(1 + lf).mean()
    return loss / len(disc.discs)


def generator_losses(disc: MultiScaleSTFTDiscriminator, real: torch.Tensor, fake: torch.Tensor):
    """(adversarial hinge loss, relative feature-matching loss) for the codec."""
    adv = fake.new_zeros(())
    feat = fake.new_zeros(())
    with torch.no_grad():
        real_out = disc(real)
    fake_out = disc(fake)
    n_feat = 0
    for (_, fr), (lf, ff) in zip(real_out, fake_out):
        adv = adv + F.relu(1 - lf).mean()
        for a, b in zip(ff, fr):
            feat = feat + (a - b).abs().mean() / (b.abs().mean() + 1e-5)
            n_feat += 1
    return adv / len(fake_out), feat / max(n_feat, 1)

"""Losses for training the image tokenizer: reconstruction, SSIM, PatchGAN (hinge), perceptual.

All images here are in [-1, 1], shape [B, 3, H, W]. Pure torch, no I/O.

- `edge_mask(x)`: pixels next to a colour change, for an extra edge-weighted L1 term.
- `corner_mask(x)`: pixels near colour changes both along rows and along columns (corners, tips,
  diagonal and curved edges), for an extra L1 term that keeps corners square.
- `ssim(a, b)`: mean structural similarity with an 11-tap Gaussian window (inputs mapped to [0, 1]).
- `PatchDiscriminator`: the pix2pix/VQGAN PatchGAN: strided convs giving one logit per patch.
- `PerceptualLoss(net)`: distance between features of an injectable network (`net(x) -> list of
  feature maps`), each channel-normalised as in LPIPS; no pretrained weights are shipped, so it is off
  by default and tests use a random stand-in network.
- `ImageLoss`: combines them with the weights of an `ImageLossConfig`, including VQGAN's adaptive
  GAN weight (ratio of reconstruction and GAN gradient norms at the decoder's last layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 2.0) -> torch.Tensor:
    """Per-image SSIM [B] of a, b [B, C, H, W] (valid-region Gaussian statistics, Wang et al. 2004)."""
    C = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(window, sigma, a.device, a.dtype).expand(C, 1, window, window)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a = F.conv2d(a, w, groups=C)  # [B, C, H', W']
    mu_b = F.conv2d(b, w, groups=C)
    var_a = F.conv2d(a * a, w, groups=C) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=C) - mu_b**2
    cov = F.conv2d(a * b, w, groups=C) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)  # [B]


def _box_max(x: torch.Tensor, k: int) -> torch.Tensor:
    """Max over a k x k window (stride 1, same size; = max_pool2d(x, k, 1, k // 2)), as running maxima
    of shifted views along W then H: a few times faster than max_pool2d on a CPU."""
    r, (H, W) = k // 2, x.shape[-2:]
    p = F.pad(x, (r, r, 0, 0), mode="replicate")  # repeating the border leaves every max unchanged
    m = p[..., :W]
    for i in range(1, k):
        m = torch.maximum(m, p[..., i:i + W])
    p = F.pad(m, (0, 0, r, r), mode="replicate")
    out = p[..., :H, :]
    for i in range(1, k):
        out = torch.maximum(out, p[..., i:i + H, :])
    return out  # [..., H, W]


@torch.no_grad()
def edge_mask(x: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """1 where a pixel's 3x3 neighbourhood spans a colour change (either side of an edge), else 0.

    x [B, C, H, W] -> [B, 1, H, W]. Weighting the L1 term there sharpens corners and thin tips, which
    the plain mean loss averages away (few pixels, large error)."""
    span = _box_max(x, 3) + _box_max(-x, 3)  # local max - local min, [B, C, H, W]
    return (span.amax(1, keepdim=True) > threshold).to(x.dtype)


@torch.no_grad()
def corner_mask(x: torch.Tensor, window: int = 5, threshold: float = 0.1) -> torch.Tensor:
    """1 where a pixel's window x window neighbourhood holds a colour change between horizontal
    neighbours AND one between vertical neighbours, else 0. x [B, C, H, W] -> [B, 1, H, W].

    Straight axis-aligned edges are not marked (only one direction changes along them); corners,
    triangle tips and the staircases of diagonal and curved edges are. A decoder trained with mean
    losses rounds exactly these, and rounding a corner by 2 px is what turns a small square's fill
    ratio into a circle's."""
    dx = ((x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True) > threshold).to(x.dtype)  # [B, 1, H, W-1]
    dy = ((x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True) > threshold).to(x.dtype)  # [B, 1, H-1, W]
    dx = F.pad(dx, (0, 1))  # change between column j and j+1, stored at j
    dy = F.pad(dy, (0, 0, 0, 1))
    return _box_max(dx, window) * _box_max(dy, window)  # [B, 1, H, W]


def margin_loss(x: torch.Tensor, rec: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean squared hinge on each pixel's RGB error beyond `margin`: x, rec [B, C, H, W] -> scalar.

    Mean L1/L2 let a few pixels at a corner or tip stay far off while the rest is near perfect; a
    pixel that far off changes colour class, which rounds a small square or blunts a triangle tip.
    This term only sees those pixels (errors below the margin cost nothing)."""
    d = ((rec - x) ** 2).sum(1).add(1e-8).sqrt()  # [B, H, W] Euclidean RGB error
    return F.relu(d - margin).pow(2).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN: [B, 3, H, W] -> logits [B, 1, H/2^n, W/2^n] (one real/fake score per patch)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            c_out = channels * min(2**i, 8)
            mods += [nn.Conv2d(c, c_out, 4, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


class PerceptualLoss(nn.Module):
    """Mean squared distance of unit-normalised features from `net` (frozen), summed over its layers."""

    def __init__(self, net: Callable[[torch.Tensor], list[torch.Tensor]] | nn.Module):
        super().__init__()
        self.net = net
        if isinstance(net, nn.Module):
            net.eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = a.new_zeros(())
        for fa, fb in zip(self.net(a), self.net(b)):
            fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-8)  # [B, C, h, w]
            fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-8)
            total = total + ((fa - fb) ** 2).sum(1).mean()
        return total


class ImageLoss(nn.Module):
    """Generator-side loss and discriminator loss for the tokenizer (weights from an ImageLossConfig)."""

    def __init__(self, cfg, perceptual_net: Callable | nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.perceptual = PerceptualLoss(perceptual_net) if (cfg.perceptual_weight > 0 and perceptual_net) else None
        if cfg.perceptual_weight > 0 and perceptual_net is None:
            raise ValueError("loss.perceptual_weight > 0 needs a perceptual network")
        self.disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers) if cfg.gan_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.gan_start_step

    def generator_loss(
        self, x: torch.Tensor, rec: torch.Tensor, aux: torch.Tensor, step: int, last_layer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x, rec [B, 3, H, W] in [-1, 1]; aux: the quantizer's loss. Returns (loss, logged parts)."""
        c = self.cfg
        parts: dict[str, torch.Tensor] = {}
        rec_loss = x.new_zeros(())
        if c.l1_weight:
            parts["l1"] = (rec - x).abs().mean()
            rec_loss = rec_loss + c.l1_weight * parts["l1"]
        if c.l2_weight:
            parts["l2"] = ((rec - x) ** 2).mean()
            rec_loss = rec_loss + c.l2_weight * parts["l2"]
        if c.edge_weight:
            parts["edge_l1"] = ((rec - x).abs() * edge_mask(x)).mean()
            rec_loss = rec_loss + c.edge_weight * parts["edge_l1"]
        if c.corner_weight:
            parts["corner_l1"] = ((rec - x).abs() * corner_mask(x, c.corner_window)).mean()
            rec_loss = rec_loss + c.corner_weight * parts["corner_l1"]
        if c.margin_weight:
            parts["margin"] = margin_loss(x, rec, c.margin)
            rec_loss = rec_loss + c.margin_weight * parts["margin"]
        if c.ssim_weight:
            parts["ssim"] = ssim(rec, x).mean()
            rec_loss = rec_loss + c.ssim_weight * (1 - parts["ssim"])
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(rec, x)
            rec_loss = rec_loss + c.perceptual_weight * parts["perceptual"]
        loss = rec_loss + aux
        parts["quant"] = aux.detach()
        if self.gan_active(step):
            g = -self.disc(rec).mean()  # the generator wants high "real" logits
            w = torch.tensor(c.gan_weight, device=x.device)
            if c.adaptive_gan_weight and last_layer is not None and rec_loss.requires_grad:
                gr = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
                gg = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
                w = w * (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4).detach()
            parts["gan_g"] = g
            parts["gan_w"] = w
            loss = loss + w * g
        parts["loss"] = loss
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def discriminator_loss(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """Hinge loss on real x and detached reconstructions."""
        logits = self.disc(torch.cat([x, rec.detach()]))  # [2B, 1, h, w]
        return hinge_d_loss(logits[: len(x)], logits[len(x):])

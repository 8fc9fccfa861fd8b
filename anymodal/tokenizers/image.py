"""Image tokenizer: a convolutional VQ autoencoder that turns an image into a grid of integer codes.

    image [B, 3, H, W] in [0, 1] -> encoder -> z [B, Cz, h, w] -> quantizer -> ids [B, h, w]
    ids -> codes -> decoder -> image [B, 3, H, W]

H and W may be any multiples of the downsample factor (the nets are convolutional and the optional
attention block has no positions), so one tokenizer encodes and decodes grids of any aspect.

The encoder/decoder are the usual VQGAN-style stacks (ResNet blocks, GroupNorm, SiLU, optional
self-attention at the lowest resolution) with one twist for cheap training on a CPU: an optional
pixel-(un)shuffle "patch" stem, so the first and last convolutions run at H/p instead of H. Flat-colour
scenes carry little information per pixel, and the sub-pixel output conv still draws sharp edges.
The downsample factor (H/h) is `patch_size * 2**(len(channels) - 1)`.

Quantizers come from `vector-quantize-pytorch`: `vq` (default) is a cosine-similarity codebook in a
low dimension (l2-normalised, ViT-VQGAN style) with k-means init, EMA updates and dead-code
replacement, which keeps codebook usage high; `fsq` and `lfq` are the lookup-free alternatives.

Files: a tokenizer dir holds `config.yaml` (an `ImageTokenizerConfig`) and `model.safetensors`.
`encode_file` / `decode_file` back `anymodal tokenizer encode|decode image`: the JSON holds the grid
the image was encoded at, and decoding writes that grid's size in pixels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from einops import rearrange
from safetensors.torch import load_file, save_file
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from ..config import check_choice, load_config, resolve_config_path, save_config
from ..data.media import Fit, fit_image, map_by_shape, open_image, save_png
from ..data.reader import BadRecord
from ..errors import ConfigError, UserError
from ..fileio import atomic_path
from .token_space import DEFAULT_IMAGE_MAX_SIDE

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class ImageModelConfig:
    resolution: int = 64  # images are resized (or letterboxed) to resolution x resolution
    downsample: int = 8  # H / h: 4, 8 or 16
    patch_size: int = 1  # pixel-unshuffle stem factor (1, 2 or 4); the rest is done by strided convs
    channels: list[int] = field(default_factory=lambda: [64, 128, 128, 256])  # one entry per level
    enc_res_blocks: int = 1  # ResNet blocks per level in the encoder
    dec_res_blocks: int = 2  # ... and in the decoder (the decoder does the harder job)
    mid_blocks: int = 1  # ResNet blocks at the lowest resolution (each side)
    attention: bool = False  # one self-attention block at the lowest resolution (each side)
    z_channels: int = 64  # width of the latent fed to the quantizer
    norm_groups: int = 8
    # Full-resolution refinement: the sub-pixel output also paints `refine_channels` feature maps,
    # and two 3x3 convs at full resolution (`refine_hidden` wide) add a residual to the RGB. Without
    # it every output pixel is a linear function of low-resolution features; the per-pixel
    # nonlinearity lets the decoder AND a horizontal and a vertical edge into a sharp corner.
    # 0 = off (and no extra weights).
    refine_channels: int = 0
    refine_hidden: int = 16
    # How inputs are fitted: resize | letterbox (to resolution x resolution) | native (their own
    # aspect, on the grid of at most `max_tokens` codes nearest it: data/media.native_grid).
    image_mode: str = "resize"
    max_tokens: int = 0  # native mode's budget of codes per image; 0: (resolution / downsample)^2
    # 'conv': a convolutional encoder whose codes also see their neighbours (and GroupNorm statistics
    # of the whole image). 'local': each code from its own downsample x downsample pixel cell alone
    # (a pixel-unshuffle and a per-cell MLP): the same cell content is always the same code, so a
    # white cell is one code, not hundreds, and the LM predicts content, not context noise.
    encoder: str = "conv"
    # What the structure half of (colour, structure) codes reads (quantizer.colour_levels):
    # 'pixels': the cell's RGB, kept blind to the ink only by loss.recolour_invariance, which a
    # training meets for some inks and not others; 'contrast': the cell's contrast map
    # (`contrast_map`), for one ink on a white ground the same whatever the ink; 'ink_mask': each
    # pixel's distance from white (`ink_map`), the same, and a cell wholly inside an object is
    # all ink where its contrast map is blank like a white cell's.
    structure_input: str = "pixels"
    contrast_floor: float = 0.2  # 'contrast', 'ink_mask': the least distance normalised to 1 ([-1, 1] units)

    def __post_init__(self) -> None:
        check_choice("model.downsample", self.downsample, (4, 8, 16))
        check_choice("model.structure_input", self.structure_input, ("pixels", *STRUCTURE_MAPS))
        if self.contrast_floor <= 0:
            raise ConfigError(f"model.contrast_floor must be > 0, got {self.contrast_floor}")
        check_choice("model.patch_size", self.patch_size, (1, 2, 4, 8))
        check_choice("model.image_mode", self.image_mode, ("resize", "letterbox", "native"))
        check_choice("model.encoder", self.encoder, ("conv", "local"))
        if self.max_tokens < 0:
            raise ConfigError(f"model.max_tokens must be >= 0, got {self.max_tokens}")
        levels = self.downsample // self.patch_size
        if self.downsample % self.patch_size or levels & (levels - 1):
            raise ConfigError(f"model.downsample {self.downsample} is not patch_size {self.patch_size} times a power of 2")
        want = int(math.log2(levels)) + 1
        if len(self.channels) != want:
            raise ConfigError(
                f"model.channels needs {want} entries for downsample {self.downsample} with patch_size "
                f"{self.patch_size}, got {len(self.channels)}"
            )
        if self.refine_channels < 0 or self.refine_hidden < 1:
            raise ConfigError("model.refine_channels must be >= 0 and model.refine_hidden >= 1")
        if self.resolution % self.downsample:
            raise ConfigError(f"model.resolution {self.resolution} is not a multiple of downsample {self.downsample}")
        for c in list(self.channels) + [self.z_channels]:
            if c % self.norm_groups:
                raise ConfigError(f"channel width {c} is not a multiple of model.norm_groups {self.norm_groups}")

    @property
    def token_budget(self) -> int:
        """Codes one image may take: `max_tokens`, or the square grid's area when that is 0."""
        return self.max_tokens or (self.resolution // self.downsample) ** 2

    def reader_args(self, image_mode: str | None = None, max_tokens: int | None = None) -> dict:
        """The `iter_documents` image arguments that fit images as this tokenizer takes them
        (its own mode and budget unless given), so trainer, prepare and eval read alike."""
        return {"image_size": self.resolution, "image_mode": image_mode or self.image_mode,
                "image_factor": self.downsample, "max_image_tokens": max_tokens or self.token_budget}


@dataclass
class ImageQuantizerConfig:
    kind: str = "vq"  # vq | fsq | lfq
    codebook_size: int = 1024  # vq and lfq (lfq needs a power of 2); fsq uses prod(fsq_levels)
    codebook_dim: int = 8  # vq: codes live in this low dimension (project in/out around it)
    cosine: bool = True  # vq: l2-normalised codes and inputs
    kmeans_init: bool = True
    kmeans_iters: int = 10
    decay: float = 0.9  # vq: EMA decay of the codebook
    dead_code_threshold: float = 2.0  # vq: codes whose EMA usage falls below this are re-seeded
    commitment_weight: float = 0.25
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    lfq_entropy_weight: float = 0.1
    # fsq: weight of a code-spreading term, 1 - H(batch code distribution) / log(codebook size),
    # with each latent softly assigned to the levels near it (temperature fsq_entropy_temp, in level
    # units). FSQ has no dead codes to re-seed; without this the encoder settles on a few hundred
    # codes and leaves the rest of the grid unused.
    fsq_entropy_weight: float = 0.0
    # the spreading weight at the end of training, reached linearly over the run (the trainer
    # reports progress); < 0 keeps fsq_entropy_weight throughout
    fsq_entropy_weight_end: float = -1.0
    fsq_entropy_temp: float = 0.5
    # fsq: weight of the mean per-latent entropy of those soft assignments (MAGVIT-v2's confidence
    # term). The batch term alone can also be raised by latents parked between levels, which
    # spreads no real codes; this one pushes each latent onto one level.
    fsq_sample_entropy_weight: float = 0.0
    # fsq with model.encoder=local: codes as (colour, structure) pairs. A second FSQ of these levels
    # quantizes each cell's colour, from a branch that sees the cell's pixels one by one and keeps
    # their maximum (which colours are there, not where); fsq_levels then quantize the cell's
    # structure, trained invariant to recolouring (loss.recolour_invariance). Code id = colour id +
    # (number of colour codes) x structure id, so the LM can learn colours and shape parts apart
    # (train image_code_embedding=factored). Empty: one FSQ over the whole latent.
    colour_levels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("quantizer.kind", self.kind, ("vq", "fsq", "lfq"))
        if self.colour_levels and (self.kind != "fsq" or min(self.colour_levels) < 3):
            raise ConfigError(f"quantizer.colour_levels {self.colour_levels} needs quantizer.kind=fsq "
                              "and at least 3 levels each")
        if self.fsq_entropy_weight < 0 or self.fsq_sample_entropy_weight < 0 or self.fsq_entropy_temp <= 0:
            raise ConfigError("quantizer.fsq_entropy_weight and fsq_sample_entropy_weight must be >= 0, "
                              "fsq_entropy_temp > 0")
        if self.kind == "lfq" and (self.codebook_size & (self.codebook_size - 1)):
            raise ConfigError(f"quantizer.codebook_size must be a power of 2 for lfq, got {self.codebook_size}")
        if self.codebook_size < 2:
            raise ConfigError("quantizer.codebook_size must be at least 2")


@dataclass
class ImageLossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    edge_weight: float = 0.0  # extra L1 on pixels next to a colour change (sharp corners and tips)
    corner_weight: float = 0.0  # extra L1 near corners, tips, diagonal and curved edges (see corner_mask)
    corner_window: int = 5  # corner_mask's window (odd): how far from a corner the extra weight reaches
    margin_weight: float = 0.0  # squared hinge on each pixel's RGB error beyond loss.margin (see margin_loss)
    margin: float = 0.15  # in [-1, 1] units (0.15 = 19 of 255): errors below it cost nothing extra
    ssim_weight: float = 0.0  # (1 - SSIM) term
    perceptual_weight: float = 0.0  # needs a feature network injected into the trainer
    gan_weight: float = 0.0  # PatchGAN hinge loss; 0 turns the discriminator off
    gan_start_step: int = 2000
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float = 2e-4
    adaptive_gan_weight: bool = True  # VQGAN's balance of the GAN gradient against the reconstruction
    # with quantizer.colour_levels: weight of the squared distance (in FSQ level units) between a
    # cell's structure latents and those of the same image recoloured by a random ink mix, so the
    # structure code carries where the ink is and the colour code carries which ink it is
    recolour_invariance: float = 1.0

    def __post_init__(self) -> None:
        if self.corner_window < 3 or self.corner_window % 2 == 0:
            raise ConfigError(f"loss.corner_window must be an odd number >= 3, got {self.corner_window}")


@dataclass
class ImageTrainConfig:
    steps: int = 2000
    max_minutes: float = 0.0  # stop early (and finish cleanly) after this long; 0 = no limit
    batch_size: int = 32  # per process
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch CPU threads per process; 0 = leave torch's default
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 50
    val_every: int = 500
    val_images: int = 256
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    colour_aug: float = 0.0  # share of training images whose RGB channels are randomly permuted
    colour_mix: float = 0.0  # share recoloured by a random ink-mixing matrix (train/image_tokenizer.mix_colours)

    def __post_init__(self) -> None:
        for name in ("colour_aug", "colour_mix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must lie in [0, 1], got {getattr(self, name)}")
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class ImageDataConfig:
    train_shards: list[str] = field(default_factory=list)  # empty = the demo world, generated into OUT/world
    val_shards: list[str] = field(default_factory=list)
    world_docs: int = 3000  # documents per generated demo-world train split
    val_docs: int = 0  # documents of its val split; 0 = a fifth of world_docs (at least 64)
    world_seed: int = 0
    in_memory: bool = True  # decode all images once into RAM (small corpora); else stream the shards
    max_images: int = 0  # cap on images read into memory; 0 = all
    shuffle_buffer: int = 2000  # streaming only
    workers: int = 0  # DataLoader workers when streaming


@dataclass
class ImageTokenizerConfig:
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    quantizer: ImageQuantizerConfig = field(default_factory=ImageQuantizerConfig)
    loss: ImageLossConfig = field(default_factory=ImageLossConfig)
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)

    def __post_init__(self) -> None:
        if self.quantizer.colour_levels and self.model.encoder != "local":
            raise ConfigError("quantizer.colour_levels needs model.encoder=local (codes of one cell each)")
        if self.model.structure_input != "pixels" and not self.quantizer.colour_levels:
            raise ConfigError(f"model.structure_input={self.model.structure_input} needs quantizer.colour_levels "
                              "(a structure half)")


# ----------------------------------------------------------------------------------------------
# building blocks


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, c_out, H, W]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (only used at the lowest resolution)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (qkv c) h w -> qkv b 1 (h w) c", qkv=3)  # one head
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2]))


def _mid(c: int, cfg: ImageModelConfig) -> list[nn.Module]:
    layers: list[nn.Module] = [ResBlock(c, c, cfg.norm_groups) for _ in range(cfg.mid_blocks)]
    if cfg.attention:
        layers += [AttnBlock(c, cfg.norm_groups), ResBlock(c, c, cfg.norm_groups)]
    return layers


class Encoder(nn.Module):
    def __init__(self, cfg: ImageModelConfig):
        super().__init__()
        ch, g, p = cfg.channels, cfg.norm_groups, cfg.patch_size
        layers: list[nn.Module] = [nn.PixelUnshuffle(p)] if p > 1 else []
        layers.append(nn.Conv2d(3 * p * p, ch[0], 3, padding=1))
        c = ch[0]
        for i, c_out in enumerate(ch):
            for _ in range(cfg.enc_res_blocks):
                layers.append(ResBlock(c, c_out, g))
                c = c_out
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halve H and W
        layers += _mid(c, cfg)
        layers += [_norm(c, g), nn.SiLU(), nn.Conv2d(c, cfg.z_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 3, H, W] -> [B, Cz, h, w]


class LocalEncoder(nn.Module):
    """Codes that depend on their own cell only: [B, 3, H, W] -> [B, Cz, H / d, W / d] by a
    pixel-unshuffle into d x d cells and an MLP per cell (1x1 convolutions, no norm across
    positions). Two cells with the same pixels get the same latent wherever they are."""

    def __init__(self, cfg: ImageModelConfig, in_channels: int = 3):
        super().__init__()
        d, c = cfg.downsample, cfg.channels[-1]
        layers: list[nn.Module] = [nn.PixelUnshuffle(d), nn.Conv2d(in_channels * d * d, c, 1)]
        # as deep as the conv encoder's blocks: one hidden layer per res block and mid block
        for _ in range(max(1, cfg.enc_res_blocks + cfg.mid_blocks)):
            layers += [nn.SiLU(), nn.Conv2d(c, c, 1)]
        layers += [nn.SiLU(), nn.Conv2d(c, cfg.z_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ColourEncoder(nn.Module):
    """A cell's colour content: [B, 3, H, W] -> [B, C, H / d, W / d] by an MLP per pixel and the
    maximum over each d x d cell. A set function of the cell's pixels: it sees which colours the
    cell holds, not where, so it cannot carry the cell's structure."""

    def __init__(self, cfg: ImageModelConfig, out_channels: int):
        super().__init__()
        c = cfg.channels[0]
        self.pixel = nn.Sequential(nn.Conv2d(3, c, 1), nn.SiLU(), nn.Conv2d(c, c, 1))
        self.pool = nn.MaxPool2d(cfg.downsample)
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(c, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(self.pixel(x)))  # [B, C, h, w]


def contrast_map(x: torch.Tensor, cell: int, floor: float) -> torch.Tensor:
    """x [B, 3, H, W] -> [B, 1, H, W]: each pixel's RGB distance from its cell's brightest pixel,
    divided by the cell's largest such distance (at least `floor`). A cell of one ink on a white
    ground maps to the ink's mask (1 on ink, 0 on ground) whatever the ink; a flat cell maps to 0."""
    b, _, height, width = x.shape
    cells = F.pixel_unshuffle(x, cell).reshape(b, 3, cell * cell, height // cell, width // cell)  # [B, 3, d², h, w]
    brightest = cells.sum(1, keepdim=True).argmax(2, keepdim=True)  # [B, 1, 1, h, w]
    ground = cells.gather(2, brightest.expand(-1, 3, -1, -1, -1))  # [B, 3, 1, h, w]
    dist = (cells - ground).norm(dim=1)  # [B, d², h, w]
    dist = dist / dist.amax(1, keepdim=True).clamp_min(floor)
    return F.pixel_shuffle(dist, cell)  # [B, 1, H, W]


def ink_map(x: torch.Tensor, cell: int, floor: float) -> torch.Tensor:
    """x [B, 3, H, W] -> [B, 1, H, W]: each pixel's RGB distance from white, divided by its cell's
    largest such distance (at least `floor`). One ink on a white ground maps to the ink's mask
    whatever the ink, as with `contrast_map`, and a cell wholly inside an object maps to ones, where
    its contrast map is blank like a white cell's (which leaves the colour code to tell the two
    apart)."""
    b, _, height, width = x.shape
    dist = (x - 1).norm(dim=1, keepdim=True)  # [B, 1, H, W]: white is 1 in [-1, 1] units
    cells = dist.view(b, 1, height // cell, cell, width // cell, cell)  # [B, 1, h, d, w, d]
    return (cells / cells.amax((3, 5), keepdim=True).clamp_min(floor)).view_as(dist)


# what the structure half reads, by model.structure_input (anything else: the cell's pixels)
STRUCTURE_MAPS = {"contrast": contrast_map, "ink_mask": ink_map}


class ColourStructureEncoder(nn.Module):
    """The latent of (colour, structure) codes: [B, 3, H, W] -> [B, Cz, h, w], the first Cz / 2
    channels from `ColourEncoder`, the rest from a `LocalEncoder` of the whole cell (or of its
    `contrast_map` or `ink_map`: model.structure_input)."""

    def __init__(self, cfg: ImageModelConfig):
        super().__init__()
        half = cfg.z_channels // 2
        self.cell, self.floor = cfg.downsample, cfg.contrast_floor
        self.structure_map = STRUCTURE_MAPS.get(cfg.structure_input)
        self.colour = ColourEncoder(cfg, half)
        self.structure = LocalEncoder(dataclasses.replace(cfg, z_channels=cfg.z_channels - half),
                                      in_channels=1 if self.structure_map else 3)

    def structure_latent(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] -> the structure latent [B, Cz - Cz / 2, h, w]."""
        return self.structure(self.structure_map(x, self.cell, self.floor) if self.structure_map else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.colour(x), self.structure_latent(x)], dim=1)


class ColourStructureFSQ(nn.Module):
    """Two FSQs over the latent's two channel halves: (colour, structure) codes with
    id = colour id + n_colour * structure id. The same calls as one FSQ (forward,
    indices_to_codes) for the rest of the tokenizer."""

    def __init__(self, colour_levels: list[int], structure_levels: list[int], dim: int):
        super().__init__()
        self.half = dim // 2
        self.colour = FSQ(levels=list(colour_levels), dim=self.half, channel_first=True)
        self.structure = FSQ(levels=list(structure_levels), dim=dim - self.half, channel_first=True)
        self.n_colour = math.prod(colour_levels)

    def parts(self, z: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
        """(FSQ, its channels of z [B, Cz, h, w]) for colour, then structure."""
        return [(self.colour, z[:, :self.half]), (self.structure, z[:, self.half:])]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (qc, ic), (qs, i_s) = (fsq(part) for fsq, part in self.parts(z))
        return torch.cat([qc, qs], dim=1), ic.long() + self.n_colour * i_s.long()  # [B, Cz, h, w], [B, h, w]

    def indices_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.colour.indices_to_codes(ids % self.n_colour),
                          self.structure.indices_to_codes(ids // self.n_colour)], dim=1)


class Decoder(nn.Module):
    def __init__(self, cfg: ImageModelConfig):
        super().__init__()
        ch, g, p = cfg.channels, cfg.norm_groups, cfg.patch_size
        c = ch[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.z_channels, c, 3, padding=1)]
        layers += _mid(c, cfg)
        for i in reversed(range(len(ch))):
            for _ in range(cfg.dec_res_blocks):
                layers.append(ResBlock(c, ch[i], g))
                c = ch[i]
            if i > 0:
                # narrow before upsampling: the conv after it runs at 4x the positions
                layers += [nn.Conv2d(c, ch[i - 1], 1), nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(ch[i - 1], ch[i - 1], 3, padding=1)]
                c = ch[i - 1]
        out = 3 + cfg.refine_channels
        layers += [_norm(c, g), nn.SiLU(), nn.Conv2d(c, out * p * p, 3, padding=1)]
        if p > 1:
            layers.append(nn.PixelShuffle(p))  # sub-pixel output: each position paints a p x p patch
        self.net = nn.Sequential(*layers)
        self.refine = None
        if cfg.refine_channels:
            self.refine = nn.Sequential(
                nn.SiLU(), nn.Conv2d(out, cfg.refine_hidden, 3, padding=1),
                nn.SiLU(), nn.Conv2d(cfg.refine_hidden, 3, 3, padding=1),
            )
            nn.init.zeros_(self.refine[-1].weight)  # starts as the plain sub-pixel decoder
            nn.init.zeros_(self.refine[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.net(z)  # [B, 3 + refine_channels, H, W]
        if self.refine is None:
            return y  # [B, 3, H, W] in about [-1, 1]
        return y[:, :3] + self.refine(y)  # [B, 3, H, W]


def fsq_positions(fsq: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """z [B, Cz, h, w] (an FSQ's input) -> [N, d] (N = B·h·w): each latent dimension bounded as
    FSQ does before rounding, in level units ([0, L - 1]; FSQ rounds these to its levels)."""
    levels = fsq._levels  # [d] int
    u = fsq.project_in(rearrange(z, "b c h w -> (b h w) c").float())  # [N, d]
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    return torch.tanh(u + torch.atanh(offset / half_l)) * half_l - offset + levels // 2


def fsq_code_entropies(fsq: nn.Module, z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies of soft FSQ code assignments, each divided by log(codebook size): (batch, per-latent).

    z [B, Cz, h, w] (the quantizer's input). Each latent dimension is bounded exactly as FSQ does
    before rounding, then softly assigned to its levels (softmax of -distance^2 / temperature); a
    latent's code distribution is the outer product over dimensions. `batch` is the entropy of the
    batch's mean distribution (high when the batch spreads over many codes); large codebooks (where
    [N, K] would not fit comfortably) use the mean of the per-dimension marginal entropies instead.
    `per-latent` is the mean entropy of each latent's own distribution (low when every latent sits
    on a level); for a product distribution it is the sum of the per-dimension entropies. Both lie
    in [0, 1]."""
    levels = fsq._levels  # [d] int
    pos = fsq_positions(fsq, z)  # [N, d]
    probs = []
    for d, n_levels in enumerate(levels.tolist()):
        grid = torch.arange(n_levels, device=z.device, dtype=pos.dtype)  # [L]
        probs.append(torch.softmax(-(pos[:, d, None] - grid) ** 2 / temperature, dim=-1))  # [N, L]
    n, k = pos.shape[0], int(levels.prod())

    def entropy(p: torch.Tensor) -> torch.Tensor:  # over the last dim
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    if n * k <= 1 << 24:
        joint = probs[0]
        for p in probs[1:]:
            joint = (joint[:, :, None] * p[:, None, :]).reshape(n, -1)  # [N, prod of levels so far]
        batch = entropy(joint.mean(0)) / math.log(k)
    else:
        batch = sum(entropy(p.mean(0)) for p in probs) / sum(math.log(n_l) for n_l in levels.tolist())
    per_latent = sum(entropy(p) for p in probs).mean() / math.log(k)  # [N] summed over dims, then mean
    return batch, per_latent


def build_quantizer(cfg: ImageQuantizerConfig, dim: int) -> nn.Module:
    # imported here so that reading a config does not pay for the library import

    if cfg.kind == "vq":
        return VectorQuantize(
            dim=dim,
            codebook_size=cfg.codebook_size,
            codebook_dim=cfg.codebook_dim,
            use_cosine_sim=cfg.cosine,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            decay=cfg.decay,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            commitment_weight=cfg.commitment_weight,
            accept_image_fmap=True,
        )
    if cfg.kind == "fsq" and cfg.colour_levels:
        return ColourStructureFSQ(cfg.colour_levels, cfg.fsq_levels, dim)
    if cfg.kind == "fsq":
        return FSQ(levels=list(cfg.fsq_levels), dim=dim, channel_first=True)
    return LFQ(
        dim=dim,
        codebook_size=cfg.codebook_size,
        entropy_loss_weight=cfg.lfq_entropy_weight,
        commitment_loss_weight=cfg.commitment_weight,
        channel_first=True,
    )


# ----------------------------------------------------------------------------------------------
# the tokenizer


class ImageTokenizer(nn.Module):
    """VQ autoencoder. `encode`/`decode` take and give images in [0, 1]; the network works in [-1, 1]."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.quantizer.colour_levels:
            self.encoder = ColourStructureEncoder(cfg.model)
        else:
            self.encoder = LocalEncoder(cfg.model) if cfg.model.encoder == "local" else Encoder(cfg.model)
        self.decoder = Decoder(cfg.model)
        self.quantizer = build_quantizer(cfg.quantizer, cfg.model.z_channels)
        self.train_progress = 0.0  # share of training done, set by the trainer (entropy schedule)

    def fsq_entropy_weight_now(self) -> float:
        qc = self.cfg.quantizer
        if qc.fsq_entropy_weight_end < 0:
            return qc.fsq_entropy_weight
        p = min(1.0, max(0.0, self.train_progress))
        return qc.fsq_entropy_weight + (qc.fsq_entropy_weight_end - qc.fsq_entropy_weight) * p

    # -- properties the rest of anymodal relies on
    @property
    def resolution(self) -> int:
        return self.cfg.model.resolution

    @property
    def grid_shape(self) -> tuple[int, int]:
        n = self.cfg.model.resolution // self.cfg.model.downsample
        return (n, n)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return self.cfg.model.downsample

    @property
    def max_tokens(self) -> int:
        """The most codes one image may take (native mode's budget; the square grid's area by default)."""
        return self.cfg.model.token_budget

    @property
    def codebook_size(self) -> int:
        q = self.cfg.quantizer
        return int(np.prod(q.fsq_levels + q.colour_levels)) if q.kind == "fsq" else q.codebook_size

    @property
    def code_factors(self) -> list[int]:
        """The factors of a code id, least significant first: [colour codes, structure codes] for
        (colour, structure) codes, else [codebook_size] (one factor: the code itself)."""
        q = self.cfg.quantizer
        if q.kind == "fsq" and q.colour_levels:
            return [math.prod(q.colour_levels), math.prod(q.fsq_levels)]
        return [self.codebook_size]

    def structure_positions(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> the structure FSQ's bounded latents [B·h·w, d] (level units),
        before rounding: what loss.recolour_invariance compares. Needs quantizer.colour_levels."""
        z = self.encoder.structure_latent(x)  # [B, Cz - Cz / 2, h, w]
        return fsq_positions(self.quantizer.structure, z)

    # -- the pieces
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, Cz, h, w] -> (quantized [B, Cz, h, w], ids [B, h, w], auxiliary loss scalar)."""
        kind = self.cfg.quantizer.kind
        if kind == "vq":
            q, ids, aux = self.quantizer(z)
        elif kind == "fsq":
            q, ids = self.quantizer(z)
            aux = z.new_zeros(())
            qc = self.cfg.quantizer
            w = self.fsq_entropy_weight_now()
            if (w > 0 or qc.fsq_sample_entropy_weight > 0) and self.training and torch.is_grad_enabled():
                # (colour, structure) codes: each part spreads over its own codes
                parts = self.quantizer.parts(z) if qc.colour_levels else [(self.quantizer, z)]
                for fsq, part in parts:
                    batch, per_latent = fsq_code_entropies(fsq, part, qc.fsq_entropy_temp)
                    aux = aux + (w * (1.0 - batch) + qc.fsq_sample_entropy_weight * per_latent) / len(parts)
        else:
            q, ids, aux = self.quantizer(z)
        return q, ids.long(), aux.sum()

    def codes_to_latent(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> quantized latent [B, Cz, h, w] (what the decoder sees)."""
        if self.cfg.quantizer.kind == "vq":
            codes = self.quantizer.codebook[ids]  # [B, h, w, codebook_dim]
            return rearrange(self.quantizer.project_out(codes), "b h w c -> b c h w")
        return self.quantizer.indices_to_codes(ids)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> (reconstruction [B, 3, H, W], ids [B, h, w], aux loss)."""
        z = self.encoder(x)  # [B, Cz, h, w]
        q, ids, aux = self.quantize(z)
        return self.decoder(q), ids, aux

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.downsample
        if (images.ndim != 4 or images.shape[1] != 3 or min(images.shape[2:]) < f
                or images.shape[2] % f or images.shape[3] % f):
            raise UserError(f"images must be [B, 3, H, W] with H and W positive multiples of {f}, "
                            f"got {list(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] in [0, 1], H and W multiples of `downsample` -> ids LongTensor
        [B, H / downsample, W / downsample]."""
        self._check_images(images)
        was = self.training
        self.eval()
        z = self.encoder(images.to(self._device()).float() * 2 - 1)
        _, ids, _ = self.quantize(z)  # eval mode: no EMA update, no dead-code replacement
        self.train(was)
        return ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] (any grid) -> images float [B, 3, h * downsample, w * downsample] in [0, 1]."""
        if ids.ndim != 3 or min(ids.shape[1:]) < 1:
            raise UserError(f"image ids must be [B, h, w] with h, w >= 1, got {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise UserError(f"image ids must lie in [0, {self.codebook_size}), got {int(ids.min())}..{int(ids.max())}")
        out = self.decoder(self.codes_to_latent(ids.to(self._device()).long()))  # [B, 3, H, W]
        return ((out + 1) / 2).clamp(0, 1)

    def fit(self, img, image_mode: str | None = None, max_tokens: int | None = None) -> tuple[np.ndarray, Fit]:
        """An RGB PIL image -> (uint8 [H, W, 3] as this tokenizer takes it, its `Fit`): the square
        `resolution` (resize / letterbox) or, native, the grid nearest its aspect within `max_tokens`
        codes (default: the tokenizer's budget)."""
        return fit_image(img, self.resolution, image_mode or self.cfg.model.image_mode, factor=self.downsample,
                         max_tokens=max_tokens or self.max_tokens, max_side=DEFAULT_IMAGE_MAX_SIDE)

    @torch.no_grad()
    def encode_pixels(self, images: list[np.ndarray], batch: int = 64) -> list[np.ndarray]:
        """uint8 [H, W, 3] images of any (mixed) sizes -> int64 code grids [H / f, W / f], in order.

        Images of one size go through the encoder together (at most `batch` at a time): a batch is
        one tensor, and a native-aspect corpus holds a handful of grid shapes."""
        dev = self._device()

        def encode(part: list[np.ndarray]) -> list[np.ndarray]:
            x = torch.from_numpy(np.stack([np.asarray(a, dtype=np.uint8) for a in part]))  # [B, H, W, 3]
            x = x.to(dev).permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W] in [0, 1]
            return list(self.encode(x).cpu().numpy().astype(np.int64))  # [B, h, w]

        return map_by_shape(images, encode, batch)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # -- files
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, d / "config.yaml", extra={"kind": "image"})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(d / "model.safetensors") as tmp:
            save_file(state, str(tmp))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
        d = Path(directory)
        if not (d / "config.yaml").is_file() or not (d / "model.safetensors").is_file():
            raise UserError(f"{d} is not an image tokenizer dir (needs config.yaml and model.safetensors)")
        cfg = load_image_config(d / "config.yaml")
        model = cls(cfg)
        try:
            state = load_file(str(d / "model.safetensors"))
            model.load_state_dict(state)
        except Exception as e:  # a truncated file or a different architecture
            raise UserError(f"cannot load {d / 'model.safetensors'}: {str(e).splitlines()[0]}") from None
        return model.to(device).eval()


def load_image_config(path: str | Path | None = None, overrides=()) -> ImageTokenizerConfig:
    """Load an `ImageTokenizerConfig` (a recipe, or a saved tokenizer's config with its `kind` tag)."""
    if path is not None:
        p = resolve_config_path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            raw = None  # load_config reports it
        if isinstance(raw, dict) and "kind" in raw:  # a saved tokenizer config (never has _base_)
            if raw.pop("kind") != "image":
                raise ConfigError(f"{p} is not an image tokenizer config")
            return load_config(ImageTokenizerConfig, None, overrides, data=raw)
    return load_config(ImageTokenizerConfig, path, overrides)


# ----------------------------------------------------------------------------------------------
# files (the CLI)


def encode_file(tok_dir: str | Path, in_image: str | Path, out_json: str | Path, max_tokens: int | None = None) -> None:
    """Image file (any format, mode and size PIL reads) -> JSON `{"grid": [h, w], "ids": [[...]]}`.

    The image keeps its aspect (the grid nearest it within `max_tokens` codes, default the
    tokenizer's budget) when the tokenizer's mode is native or `max_tokens` is given; else it is
    fitted to the square resolution by the tokenizer's resize/letterbox mode."""

    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    tok = ImageTokenizer.load(tok_dir)
    if not Path(in_image).is_file():
        raise UserError(f"no such image file: {in_image}")
    try:
        img = open_image(Path(in_image))
    except BadRecord as e:
        raise UserError(f"cannot read image {in_image}: {e}") from None
    arr, _ = tok.fit(img, "native" if max_tokens is not None else None, max_tokens)  # uint8 [H, W, 3]
    ids = tok.encode_pixels([arr])[0]  # [h, w]
    doc = {"kind": "image", "grid": list(ids.shape), "codebook_size": tok.codebook_size, "ids": ids.tolist()}
    Path(out_json).write_text(json.dumps(doc))


def read_ids_json(path: str | Path, grid: tuple[int, int] | None, codebook_size: int,
                  max_side: int = DEFAULT_IMAGE_MAX_SIDE) -> torch.Tensor:
    """Read and validate an ids file -> LongTensor [h, w].

    `{"grid": [h, w], "ids": ...}` (as `encode_file` writes), `{"ids": [[...]]}` or a bare nested
    list: any grid of sides 1..`max_side`. A flat raster-order list needs the grid: the file's
    "grid", else `grid` (the tokenizer's square default)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such ids file: {path}")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a JSON ids file: {e}") from None
    ids = doc.get("ids") if isinstance(doc, dict) else doc
    want = doc.get("grid") if isinstance(doc, dict) else None
    if want is not None:
        if not (isinstance(want, list) and len(want) == 2 and all(type(n) is int and 1 <= n <= max_side for n in want)):
            raise UserError(f"{path}: 'grid' must be [h, w] with sides 1..{max_side}, got {str(want)[:40]}")
        want = tuple(want)
    try:
        arr = np.asarray(ids)
    except Exception:
        arr = np.asarray([])
    if arr.dtype == object or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{path}: 'ids' must be a grid (list of rows) of integers")
    flat_grid = want or grid
    if arr.ndim == 1 and flat_grid is not None and arr.shape == (flat_grid[0] * flat_grid[1],):
        arr = arr.reshape(flat_grid)  # a flat raster-order list is fine too
    if arr.ndim != 2:
        raise UserError(f"{path}: ids have shape {list(arr.shape)}, not a grid [h, w]")
    if want is not None and arr.shape != want:
        raise UserError(f"{path}: ids have shape {list(arr.shape)}, its 'grid' says {list(want)}")
    if max(arr.shape) > max_side:
        raise UserError(f"{path}: a grid of {list(arr.shape)} has a side over {max_side} codes")
    if not np.all(np.equal(np.mod(arr, 1), 0)):
        raise UserError(f"{path}: ids must be integers")
    if arr.min() < 0 or arr.max() >= codebook_size:
        raise UserError(f"{path}: ids must lie in [0, {codebook_size}), found {int(arr.min())}..{int(arr.max())}")
    return torch.from_numpy(arr.astype(np.int64))


def decode_file(tok_dir: str | Path, in_json: str | Path, out_png: str | Path) -> None:
    """JSON ids (as `encode_file` writes, any grid) -> PNG of grid * downsample pixels."""

    tok = ImageTokenizer.load(tok_dir)
    ids = read_ids_json(in_json, tok.grid_shape, tok.codebook_size)
    img = tok.decode(ids[None])[0]  # [3, H, W]
    arr = (rearrange(img, "c h w -> h w c").cpu().numpy() * 255).round().astype(np.uint8)  # [H, W, 3]
    save_png(arr, out_png)

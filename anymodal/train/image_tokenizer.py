"""Train the image tokenizer (VQ autoencoder) on raw shards: `anymodal tokenizer train image ...`.

One process:            anymodal tokenizer train image --config tokenizer/image_demo.yaml --out DIR
Several (CPU or GPU):   torchrun --nproc_per_node N -m anymodal.cli tokenizer train image ... --out DIR
(gloo on CPU, nccl on CUDA; each process sees its own share of the data, gradients are averaged by
DDP and the VQ codebook's EMA statistics are all-reduced by vector-quantize-pytorch itself.)

Data: `data.train_shards` / `data.val_shards` (any pattern the reader takes); when empty, the demo
world is generated into `OUT/world/`. Bad records are skipped and counted by the reader.
Images are read as the tokenizer takes them (`ImageModelConfig.reader_args`): resize/letterbox to
the square resolution, or in `model.image_mode: native` each on the grid nearest its own aspect
within `model.max_tokens` codes, so a corpus of mixed aspects trains the nets on mixed grids. A
batch is always one image size: images are bucketed by size, and each bucket gives out batches.
Small corpora are decoded once into RAM (`data.in_memory`, batches drawn by a per-epoch permutation
that depends only on (seed, rank, step), so a resumed run sees exactly the batches it would have
seen); large ones are streamed with a shuffle buffer.

`ImageTrainer` builds the run and restores it; its `train_step` returns the step's `ImageStepStats`
(one `OUT/train_log.jsonl` record every `train.log_every` steps). Every `train.val_every` steps: PSNR,
SSIM, codebook usage and perplexity on the val images, the docs/world.md image check's agreement
between original and reconstruction, and a reconstruction grid PNG (`OUT/val/step_*.png`: originals
on top, reconstructions below). Checkpoints (`OUT/checkpoints/step_*.pt`, anymodal.train.checkpoint)
hold model, optimizer(s), step, elapsed time and RNG states; `--resume` continues from the newest. At
the end: `OUT/config.yaml`, `OUT/model.safetensors`, `OUT/metrics.json`.

`train.max_minutes` turns the LR schedule into a time budget: progress = max(step / steps,
elapsed / budget), so the cosine decay (anymodal.train.schedule) finishes when the budget does.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torchvision.utils import make_grid

from ..config import save_config, to_dict
from ..data.checker import analyse_image, objects_match
from ..data.media import save_png
from ..data.reader import RecordCounter, iter_images
from ..data.world import generate_world
from ..errors import UserError
from ..fileio import write_atomic
from ..tokenizers.image import ImageTokenizer, ImageTokenizerConfig, load_image_config
from ..tokenizers.image_losses import ImageLoss, hinge_d_loss, ssim
from .checkpoint import CKPT_DIR, latest_checkpoint, load_state, rng_state, save_state, set_rng_state
from .cpu_memory import keep_freed_memory
from .metrics import MetricsLog
from .progress import ProgressBar
from .schedule import decay_progress, lr_factor

# ----------------------------------------------------------------------------------------------
# process group


def _setup_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but CUDA is not available")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if use_cuda and local_world > torch.cuda.device_count():
        raise UserError(f"{local_world} processes per node but {torch.cuda.device_count()} GPU(s): launch at most "
                        "one process per GPU, or train on the CPU with train.device=cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# data


def _world_shards(out: Path, cfg: ImageTokenizerConfig, rank: int) -> tuple[str, str]:
    """Generate the demo world (images only: no speech) into OUT/world once; return shard globs."""
    d = cfg.data
    root = out / "world"
    for split, docs in (("train", d.world_docs), ("val", d.val_docs or max(64, d.world_docs // 5))):
        if rank == 0 and not (root / split / f"{split}.json").is_file():
            generate_world(root / split, split=split, docs=docs, seed=d.world_seed, audio=False, progress=False)
        _barrier()
    return str(root / "train" / "*.tar"), str(root / "val" / "*.tar")


Images = torch.Tensor | list[torch.Tensor]  # uint8 [N, H, W, 3], or one such tensor per image size


def _buckets(images: Images) -> list[torch.Tensor]:
    return [images] if isinstance(images, torch.Tensor) else list(images)


def _load_images(shards, cfg: ImageTokenizerConfig, limit: int, counter, rank=0, world=1) -> Images:
    """Decode images into one uint8 tensor [N, H, W, 3] when they share one size (always so in
    resize/letterbox mode), else a list of them, one per size in order of first appearance."""
    by_size: dict[tuple[int, ...], list[torch.Tensor]] = {}
    n = 0
    for img in iter_images(shards, **cfg.model.reader_args(), rank=rank, world_size=world, counter=counter):
        by_size.setdefault(img.shape, []).append(torch.from_numpy(np.ascontiguousarray(img)))
        n += 1
        if limit and n >= limit:
            break
    if not n:
        raise UserError(f"no readable images in {shards}")
    stacked = [torch.stack(group) for group in by_size.values()]
    return stacked[0] if len(stacked) == 1 else stacked


class MemoryBatches:
    """Batches from images held in RAM; batch `step` depends only on (seed, rank, step).

    Each epoch walks one random permutation of all images and deals each to its size's bucket; a
    bucket that holds a batch (`batch` images, or all of its own when it has fewer) gives it out,
    and what is left at the end of the epoch waits for the next permutation. So a batch is one size,
    every size is seen in proportion to its images, and with one size this is the permutation cut
    into consecutive batches."""

    def __init__(self, images: Images, batch: int, seed: int, rank: int):
        self.buckets = _buckets(images)
        counts = [len(b) for b in self.buckets]
        self.sizes = [min(batch, n) for n in counts]  # batch size of each bucket
        self.starts = np.cumsum([0] + counts)  # bucket k holds global indices [starts[k], starts[k + 1])
        self.batch, self.seed, self.rank = min(batch, sum(counts)), seed, rank
        self.per_epoch = max(1, sum(n // b for n, b in zip(counts, self.sizes)))
        self._epoch, self._plan = -1, []

    def _deal(self, epoch: int) -> list[tuple[int, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + epoch)
        perm = torch.randperm(int(self.starts[-1]), generator=g).numpy()
        bucket_of = np.searchsorted(self.starts, perm, side="right") - 1
        pending: list[list[int]] = [[] for _ in self.buckets]
        plan = []
        for i, k in zip(perm.tolist(), bucket_of.tolist()):
            pending[k].append(i - int(self.starts[k]))
            if len(pending[k]) == self.sizes[k]:
                plan.append((k, torch.tensor(pending[k])))
                pending[k] = []
        return plan

    def get(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._plan, self._epoch = self._deal(epoch), epoch
        k, idx = self._plan[i]
        return self.buckets[k][idx]  # [B, H, W, 3] uint8


class _ImageStream(torch.utils.data.IterableDataset):
    """One pass over this rank's images (the reader also splits by DataLoader worker), as batches:
    each image size fills a bucket of its own, and a full bucket is one batch (what is left of each
    size at the end of the pass is dropped, as a DataLoader's drop_last drops a partial batch)."""

    def __init__(self, shards, cfg: ImageTokenizerConfig, rank: int, world: int, seed: int, counter, batch: int):
        super().__init__()
        self.shards, self.cfg, self.rank, self.world, self.seed, self.counter = shards, cfg, rank, world, seed, counter
        self.batch = batch

    def __iter__(self):
        pending: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for img in iter_images(self.shards, **self.cfg.model.reader_args(), rank=self.rank, world_size=self.world,
                               counter=self.counter, shuffle=True, seed=self.seed,
                               shuffle_buffer=self.cfg.data.shuffle_buffer):
            group = pending.setdefault(img.shape, [])
            group.append(torch.from_numpy(np.ascontiguousarray(img)))  # [H, W, 3] uint8
            if len(group) == self.batch:
                yield torch.stack(group)  # [B, H, W, 3]
                pending[img.shape] = []


class StreamBatches:
    """Batches streamed from shards; each epoch reshuffles shard order and a document buffer.

    Resuming restarts the stream at a fresh epoch (seeded by the step), not at the exact record."""

    def __init__(self, shards, cfg: ImageTokenizerConfig, rank: int, world: int, counter):
        self.shards, self.cfg, self.rank, self.world, self.counter = shards, cfg, rank, world, counter
        self._it = None

    def _batches(self, start_step: int):
        d, t = self.cfg.data, self.cfg.train
        epoch = 0
        while True:
            ds = _ImageStream(self.shards, self.cfg, self.rank, self.world, t.seed + start_step + epoch,
                              self.counter if d.workers == 0 else None, t.batch_size)  # worker counts stay there
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=d.workers)  # batched by the stream
            n = 0
            for batch in loader:
                n += 1
                yield batch  # [B, H, W, 3] uint8
            if n == 0:
                raise UserError(f"fewer than batch_size={t.batch_size} readable images of one size in {self.shards}")
            epoch += 1

    def get(self, step: int) -> torch.Tensor:
        if self._it is None:
            self._it = self._batches(step)
        return next(self._it)


def permute_colours(batch: torch.Tensor, share: float, seed: int, step: int) -> torch.Tensor:
    """Permute the RGB channels of a random `share` of a uint8 batch [B, H, W, 3] (white stays white).

    Decouples colour from shape: in the demo world some colour+shape pairs appear only in val, and
    without this the decoder draws an unseen purple triangle half blue. Depends only on (seed, step),
    so a resumed run sees the same batches."""
    if share <= 0:
        return batch
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 17)
    pick = torch.rand(len(batch), generator=g) < share  # [B]
    perms = torch.stack([torch.randperm(3, generator=g) for _ in range(len(batch))])  # [B, 3]
    perms[~pick] = torch.arange(3)  # the rest keep their channel order
    return batch.gather(-1, perms[:, None, None, :].expand_as(batch))  # [B, H, W, 3]


def mix_colours(batch: torch.Tensor, share: float, seed: int, step: int) -> torch.Tensor:
    """Recolour a random `share` of a uint8 batch [B, H, W, 3] by a random ink-mixing matrix.

    In "ink" space (255 - pixel, white = 0) each picked image gets ink' = M ink with M a random
    row-stochastic 3x3 matrix (a channel permutation blended with random mixing weights), so
    white stays white, every ink stays in range and any shape can come in (nearly) any colour.
    Channel permutation alone only reaches six fixed recolourings of each palette colour; the
    demo world's val-only pairs (a purple triangle) were still drawn in the nearest train colour.
    Depends only on (seed, step), so a resumed run sees the same batches."""
    if share <= 0:
        return batch
    b = len(batch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 29)
    pick = torch.rand(b, generator=g) < share  # [B]
    perm = torch.eye(3)[torch.stack([torch.randperm(3, generator=g) for _ in range(b)])]  # [B, 3, 3]
    e = -torch.log(torch.rand(b, 3, 3, generator=g).clamp_min(1e-12))
    mix = e / e.sum(-1, keepdim=True)  # rows: Dirichlet(1, 1, 1)
    alpha = torch.rand(b, 1, 1, generator=g)
    m = (1 - alpha) * perm + alpha * mix  # [B, 3, 3], rows sum to 1
    m[~pick] = torch.eye(3)
    ink = 255.0 - batch.float()  # [B, H, W, 3]
    out = 255.0 - torch.einsum("bhwc,bdc->bhwd", ink, m)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_model_space(batch: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


# ----------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def evaluate(tok: ImageTokenizer, images: Images, batch: int = 64, image_check: bool = True) -> tuple[dict, Images]:
    """Metrics of tok on uint8 images [N, H, W, 3] (or a list of such tensors, one per size: every
    image counts once, whatever its size); also returns the reconstructions (uint8, same layout)."""
    was = tok.training
    tok.eval()
    dev = next(tok.parameters()).device
    psnr, ss, all_ids, rec_buckets = [], [], [], []
    for bucket in _buckets(images):
        recs = []
        for i in range(0, len(bucket), batch):
            x = bucket[i:i + batch].to(dev).permute(0, 3, 1, 2).float() / 255  # [b, 3, H, W]
            ids = tok.encode(x)  # [b, h, w]
            rec = tok.decode(ids)  # [b, 3, H, W] in [0, 1]
            rec = (rec * 255).round() / 255  # measure what a PNG of it would hold
            mse = ((rec - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
            psnr.append(10 * torch.log10(1 / mse))
            ss.append(ssim(rec * 2 - 1, x * 2 - 1))
            recs.append((rec * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
            all_ids.append(ids.flatten().cpu())
        rec_buckets.append(torch.cat(recs))
    ids = torch.cat(all_ids)
    counts = torch.bincount(ids, minlength=tok.codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    metrics = {
        "psnr": float(torch.cat(psnr).mean()),
        "ssim": float(torch.cat(ss).mean()),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "n_images": sum(len(b) for b in _buckets(images)),
    }
    if image_check:
        originals = [a for b in _buckets(images) for a in b.numpy()]
        metrics["image_check_agreement"] = image_check_agreement(originals, [a for b in rec_buckets for a in b.numpy()])
    tok.train(was)
    return metrics, rec_buckets[0] if isinstance(images, torch.Tensor) else rec_buckets


def image_check_agreement(originals: np.ndarray, recons: np.ndarray) -> float:
    """Share of images whose image check (docs/world.md) finds the same (colour, shape) objects in both."""
    same = [objects_match(analyse_image(b), analyse_image(a)) for a, b in zip(originals, recons)]
    return float(np.mean(same)) if same else 0.0


def _first_images(images: Images, n: int) -> list[torch.Tensor]:
    """Up to n images [H, W, 3], taken from the sizes in turn (so a mixed set shows each aspect)."""
    buckets = _buckets(images)
    order = [(k, i) for i in range(max(len(b) for b in buckets)) for k, b in enumerate(buckets) if i < len(b)]
    return [buckets[k][i] for k, i in order[:n]]


def save_grid(originals: Images, recons: Images, path: Path, n: int = 8) -> None:
    """PNG: n originals on the top row, their reconstructions below (uint8 [N, H, W, 3] inputs, or
    lists of them per size: each tile is then centred on a white cell of the largest size)."""
    tiles = _first_images(originals, n) + _first_images(recons, n)
    n = len(tiles) // 2
    cell_h, cell_w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cells = []
    for t in tiles:
        dh, dw = cell_h - t.shape[0], cell_w - t.shape[1]
        cells.append(F.pad(rearrange(t, "h w c -> c h w"), (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=255))
    sheet = make_grid(torch.stack(cells), nrow=n, padding=0)  # [3, 2H, nW]: originals, then reconstructions
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(rearrange(sheet, "c h w -> h w c").numpy(), path)


# ----------------------------------------------------------------------------------------------
# training


def _last_conv_weight(tok: ImageTokenizer) -> torch.Tensor:
    convs = [m for m in tok.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1].weight


@dataclass
class ImageStepStats:
    """One training step: what its train_log.jsonl record holds."""

    step: int  # the step done (1-based)
    lr: float
    elapsed: float  # training seconds so far, earlier sessions included
    losses: dict[str, float]  # the generator's total ("loss") and its terms (anymodal.tokenizers.image_losses)
    grad_norm: float | None = None  # before clipping; None without train.grad_clip
    d_loss: float | None = None  # the discriminator's hinge loss, once the GAN is on

    @property
    def loss(self) -> float:
        return self.losses["loss"]

    def record(self) -> dict:
        rec = {"step": self.step, "lr": self.lr, "elapsed": self.elapsed, **self.losses}
        if self.grad_norm is not None:
            rec["grad_norm"] = self.grad_norm
        if self.d_loss is not None:
            rec["d_loss"] = self.d_loss
        return rec


class ImageTrainer:
    """One process's part of a run: built (and with `resume`, restored) on construction; `train_step`
    runs one step, `run` the loop with its logging, validation and checkpoints."""

    def __init__(self, cfg: ImageTokenizerConfig, out: str | Path, resume: bool = False, perceptual_net=None):
        self.cfg, self.out = cfg, Path(out)
        t = cfg.train
        self.rank, self.world, self.device = rank, world, device = _setup_distributed(t.device)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(t.seed + rank)
        np.random.seed((t.seed + rank) % 2**32)
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        _barrier()

        self.counter = RecordCounter()
        if cfg.data.train_shards:
            train_shards, val_shards = list(cfg.data.train_shards), list(cfg.data.val_shards)
        else:
            train_shards, val_shards = _world_shards(self.out, cfg, rank)
        if cfg.data.in_memory:
            self.batches = MemoryBatches(_load_images(train_shards, cfg, cfg.data.max_images, self.counter),
                                         t.batch_size, t.seed, rank)
        else:
            self.batches = StreamBatches(train_shards, cfg, rank, world, self.counter)
        self.val_images = None
        if rank == 0 and t.val_images > 0 and val_shards:
            self.val_images = _load_images(val_shards, cfg, t.val_images, self.counter)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.tok = ImageTokenizer(cfg).to(device)
        if t.channels_last:
            self.tok = self.tok.to(memory_format=torch.channels_last)
        self.loss_fn = ImageLoss(cfg.loss, perceptual_net).to(device)
        self.opt = torch.optim.AdamW(self.tok.parameters(), lr=t.lr, betas=tuple(t.betas),
                                     weight_decay=t.weight_decay, foreach=True)
        self.d_opt = None
        if self.loss_fn.disc is not None:
            self.d_opt = torch.optim.AdamW(self.loss_fn.disc.parameters(), lr=cfg.loss.disc_lr, betas=(0.5, 0.9))

        self.step, self.elapsed_before, self.history = 0, 0.0, []
        self.ckpt_dir = self.out / CKPT_DIR
        self.resumed = resume
        if resume:
            found = latest_checkpoint(self.ckpt_dir)
            if found is None:
                raise UserError(f"--resume: no checkpoint in {self.ckpt_dir}")
            self.restore(found[1])

        self.model, self.disc = self.tok, self.loss_fn.disc
        if world > 1:
            # the VQ syncs its own EMA buffers; broadcasting them from rank 0 would fight that
            self.model = torch.nn.parallel.DistributedDataParallel(self.tok, broadcast_buffers=False)
            if self.disc is not None:
                self.disc = torch.nn.parallel.DistributedDataParallel(self.disc, broadcast_buffers=False)
        self.last_layer = _last_conv_weight(self.tok)
        self.amp = t.amp and device.type == "cuda"
        self.t0 = time.time() - self.elapsed_before
        self.tok.train()
        self.frac = self.progress()  # share of the run done: drives the lr and the stop

    def restore(self, path: Path) -> None:
        state = load_state(path, self.device)
        self.tok.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.d_opt is not None and "disc" in state:
            self.loss_fn.disc.load_state_dict(state["disc"])
            self.d_opt.load_state_dict(state["disc_opt"])
        self.step, self.elapsed_before = int(state["step"]), float(state["elapsed"])
        rngs = state["rng"]  # one per rank of the saving run
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.history = json.loads(state.get("history", "[]"))

    def elapsed(self) -> float:
        return time.time() - self.t0

    def progress(self) -> float:
        """Share of the run done: of the steps, or of the time budget when further; with a budget every
        rank uses rank 0's clock (same lr, same stop)."""
        t = self.cfg.train
        p = decay_progress(self.step, 0, t.steps, self.elapsed(), t.max_minutes * 60)
        if t.max_minutes > 0 and self.world > 1:
            p_t = torch.tensor([p], dtype=torch.float64, device=self.device)
            dist.broadcast(p_t, 0)
            p = float(p_t)
        return p

    def next_batch(self) -> torch.Tensor:
        """This rank's uint8 images [B, H, W, 3] of the next step (one size), colour-augmented."""
        t, step = self.cfg.train, self.step
        raw = permute_colours(self.batches.get(step), t.colour_aug, t.seed, step)
        return mix_colours(raw, t.colour_mix, t.seed, step)

    def train_step(self, raw: torch.Tensor) -> ImageStepStats:
        """One generator (and, once the GAN is on, discriminator) update on uint8 images [B, H, W, 3]."""
        t, step, loss_fn, disc = self.cfg.train, self.step, self.loss_fn, self.disc
        lr = t.lr * lr_factor(step, t.warmup_steps, self.frac, t.min_lr_ratio)
        self.tok.train_progress = self.frac
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = to_model_space(raw, self.device, t.channels_last)  # [B, 3, H, W]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            rec, ids, aux = self.model(x)
        rec = rec.float()
        gan_on = loss_fn.gan_active(step)
        if disc is not None:
            disc.requires_grad_(False)
        # the generator side calls the unwrapped discriminator (its weights are frozen here)
        loss, parts = loss_fn.generator_loss(x, rec, aux, step, self.last_layer if gan_on else None)
        w = self.cfg.loss.recolour_invariance
        if self.cfg.quantizer.colour_levels and w > 0:
            # the same images in other inks: their structure latents must not move
            other = to_model_space(mix_colours(raw, 1.0, t.seed + 1, step), self.device, t.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                drift = (self.tok.structure_positions(x) - self.tok.structure_positions(other)).pow(2).mean()
            loss = loss + w * drift
            parts["recolour_drift"], parts["loss"] = float(drift.detach()), float(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if t.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.tok.parameters(), t.grad_clip))
        self.opt.step()
        d_loss = None
        if gan_on:
            disc.requires_grad_(True)
            logits = disc(torch.cat([x, rec.detach()]))  # one forward: DDP wants one per backward
            d_loss_t = hinge_d_loss(logits[: len(x)], logits[len(x):])
            self.d_opt.zero_grad(set_to_none=True)
            d_loss_t.backward()
            self.d_opt.step()
            d_loss = float(d_loss_t)
        self.step += 1
        if not math.isfinite(parts["loss"]):
            raise RuntimeError(f"image tokenizer loss became {parts['loss']} at step {self.step}")
        stats = ImageStepStats(self.step, lr, self.elapsed(), parts, grad_norm, d_loss)
        self.frac = self.progress()
        return stats

    def validate(self) -> dict:
        """Rank 0: metrics on the val images and their reconstruction grid (OUT/val/step_*.png)."""
        metrics, rec_u8 = evaluate(self.tok, self.val_images)
        metrics["step"] = self.step
        self.history.append(metrics)
        save_grid(self.val_images, rec_u8, self.out / "val" / f"step_{self.step:08d}.png")
        return metrics

    def save(self) -> None:
        """Collective: rank 0 writes model + optimizers + every rank's RNG state (gathered)."""
        rngs = [rng_state()]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.rank == 0:
            state = {
                "model": self.tok.state_dict(),
                "opt": self.opt.state_dict(),
                "step": self.step,
                "elapsed": self.elapsed(),
                "rng": rngs,
                "history": json.dumps(self.history),
                "config": json.dumps(to_dict(self.cfg)),
            }
            if self.d_opt is not None:
                state["disc"] = self.loss_fn.disc.state_dict()
                state["disc_opt"] = self.d_opt.state_dict()
            save_state(self.ckpt_dir, self.step, state, self.cfg.train.keep_checkpoints)
        _barrier()

    def run(self, progress: bool = True) -> dict:
        """Train until the steps or the time budget run out; write OUT/{config.yaml, model.safetensors,
        metrics.json} and return the final metrics (rank 0; {} elsewhere)."""
        t, rank = self.cfg.train, self.rank
        bar = ProgressBar(t.steps, self.step, "image tokenizer", t.max_minutes, self.elapsed_before,
                          disable=not progress or rank != 0)
        metrics: dict = dict(self.history[-1]) if self.history else {}
        log = MetricsLog(self.out / "train_log.jsonl", keep_until_step=self.step if self.resumed else None,
                         enabled=rank == 0)
        with log:
            try:
                while self.frac < 1.0:
                    stats = self.train_step(self.next_batch())
                    step, done = stats.step, self.frac >= 1.0
                    bar.update(step, stats.elapsed, loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}")
                    if step % t.log_every == 0:
                        log.write(stats.record())
                    if self.val_images is not None and (step % t.val_every == 0 or done):
                        metrics = self.validate()
                        log.write({"val": metrics})
                        bar.set_postfix(psnr=f"{metrics['psnr']:.2f}", usage=f"{metrics['codebook_usage']:.2f}")
                    if t.ckpt_every > 0 and (step % t.ckpt_every == 0 or done):
                        self.save()
            finally:
                bar.close()
        result = {}
        if rank == 0:
            self.tok.save(self.out)
            result = {"final": metrics, "history": self.history, "steps": self.step, "seconds": self.elapsed(),
                      "world_size": self.world, "records": self.counter.as_dict()}
            write_atomic(self.out / "metrics.json", json.dumps(result, indent=2))
        _barrier()
        return result


def train(cfg: ImageTokenizerConfig, out: str | Path, resume: bool = False, perceptual_net=None,
          progress: bool = True) -> dict:
    """Train, write OUT/{config.yaml, model.safetensors, metrics.json}; return the final metrics."""
    return ImageTrainer(cfg, out, resume, perceptual_net).run(progress)


def train_from_cli(config, overrides=(), out=None, resume: bool = False) -> dict:
    """Entry point of `anymodal tokenizer train image --config C [k=v ...] --out DIR [--resume]`."""
    if out is None:
        raise UserError("--out is required")
    cfg = load_image_config(config, overrides)
    out = Path(out)
    if resume and (out / "run_config.yaml").is_file():
        saved = load_image_config(out / "run_config.yaml")
        if to_dict(saved)["model"] != to_dict(cfg)["model"] or to_dict(saved)["quantizer"] != to_dict(cfg)["quantizer"]:
            raise UserError(f"--resume: the model/quantizer config differs from the one {out} was started with")
    if not resume and latest_checkpoint(out / CKPT_DIR) is not None:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, out / "run_config.yaml")
    result = train(cfg, out, resume=resume)
    if result and int(os.environ.get("RANK", "0")) == 0:
        f = result.get("final", {})
        if f:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in f.items()}))
    return result

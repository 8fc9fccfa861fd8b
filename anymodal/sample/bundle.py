"""Loading a model bundle for sampling, grounding and eval, plus tiny random bundles for tests.

A bundle is `config.yaml` (the ModelConfig), `model.safetensors`, `token_space.json` and the three
tokenizers (`text/`, `image/`, `audio/`, directly or under `tokenizers/`), as written by
`anymodal export` (`train/export.py`). `load_bundle` is the one reader of that layout; weights are
read with safetensors only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..config import load_config, save_config
from ..errors import UserError
from ..fileio import atomic_path
from ..model.config import ModelConfig
from ..model.transformer import Transformer
from ..tokenizers import Stream, Tokenizers, build_space, load_tokenizers
from ..tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from ..tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from ..tokenizers.text import TextTokenizerConfig, train_text_tokenizer
from ..tokenizers.token_space import TokenSpace


@dataclass
class Bundle:
    model: torch.nn.Module  # Transformer, in eval mode
    tok: object  # anymodal.tokenizers.Tokenizers (text, image, audio, space, stream)
    path: Path | None = None

    @property
    def space(self):
        return self.tok.space

    @property
    def stream(self):
        return self.tok.stream

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_image_tokens(self) -> int | None:
        """The most codes of an image whose grid the model chooses: the image tokenizer's `max_tokens`
        (pass it to `Engine`); None without an image tokenizer."""
        return self.tok.image.max_tokens if self.tok.image is not None else None


def pick_device(device: str | None = None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return device


def set_threads(bundle: Bundle, threads: int | str = "auto") -> int:
    """Torch CPU threads for sampling (the CLI calls this; library code leaves threads alone).

    Decoding one token at a time runs hundreds of tiny ops per token; for a small model the
    thread hand-offs cost more than they save (on a busy 2-core machine a 9M-parameter model ran
    4x slower on 2 threads than on 1). 'auto': one thread per ~25M parameters, at most all cores.
    """
    if bundle.device.type != "cpu":
        return torch.get_num_threads()
    if threads == "auto":
        params = sum(p.numel() for p in bundle.model.parameters())
        n = max(1, min(os.cpu_count() or 1, params // 25_000_000))
    else:
        try:
            n = int(threads)
        except ValueError:
            raise UserError(f"--threads must be 'auto' or a positive integer, got {threads!r}") from None
        if n < 1:
            raise UserError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def load_bundle(path: str | Path, device: str | None = None) -> Bundle:
    """Load a bundle dir onto `device` ('auto' = CUDA when present). UserError if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model bundle not found: {path}")
    device = pick_device(device)
    cfg_path, weights = path / "config.yaml", path / "model.safetensors"
    for p in (cfg_path, weights, path / "token_space.json"):
        if not p.is_file():
            raise UserError(f"{path} is not a model bundle (missing {p.name})")
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    model_cfg = raw.get("model", raw) if isinstance(raw, dict) else {}
    known = set(ModelConfig.__dataclass_fields__)
    cfg = load_config(ModelConfig, data={k: v for k, v in model_cfg.items() if k in known})
    tok_dir = path / "tokenizers" if (path / "tokenizers").is_dir() else path
    tok = load_tokenizers(tok_dir, device=device)
    TokenSpace.load(path).check_same(tok.space, f"{path}: model vs its tokenizers")
    if cfg.vocab_size != tok.space.vocab_size:
        raise UserError(f"{path}: model vocab {cfg.vocab_size} != token space {tok.space.vocab_size}")
    model = Transformer(cfg)
    state = load_file(str(weights), device="cpu")
    missing, unexpected = model.load_weights(state)
    if missing or unexpected:
        raise UserError(f"{weights} does not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return Bundle(model.to(device).eval(), tok, path)


def save_bundle_layout(bundle: Bundle, out: str | Path) -> Path:
    """Write `bundle` in the layout ``load_bundle`` reads (used for tiny test/benchmark bundles)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(bundle.model.cfg, out / "config.yaml")
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.weights().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    t = bundle.tok
    t.text.save(out / "text")
    if t.image is not None:
        t.image.save(out / "image")
    if t.audio is not None:
        t.audio.save(out / "audio")
    t.space.save(out / "token_space.json")
    return out


# ---- tiny random bundles (tests and benchmarks) -----------------------------------------------------
TINY_SENTENCES = [
    "a small red circle at the top left and a large blue square in the center",
    "there is a large green triangle at the bottom right",
    "a picture of a small purple square at the left and a small orange circle at the right",
    "say: the yellow triangle is at the top",
    "the quick brown fox jumps over the lazy dog. Python is a programming language.",
]


def tiny_bundle(
    dim: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    max_seq_len: int = 512,
    image_resolution: int = 16,
    image_downsample: int = 4,
    image_codebook: int = 32,
    audio_n_q: int = 2,
    audio_codebook: int = 16,
    loc_bins: int = 32,
    text_vocab: int = 340,
    seed: int = 0,
    model_overrides: dict | None = None,
) -> Bundle:
    """A random-weight model with real (tiny, untrained) text/image/audio tokenizers."""
    torch.manual_seed(seed)
    text = train_text_tokenizer(TextTokenizerConfig(vocab_size=text_vocab, loc_bins=loc_bins),
                                TINY_SENTENCES * 20)
    icfg = ImageTokenizerConfig()
    icfg.model.resolution = image_resolution
    icfg.model.downsample = image_downsample
    levels = image_downsample.bit_length()  # log2(downsample) + 1 levels
    icfg.model.channels = [8] * levels
    icfg.model.z_channels = 8
    icfg.model.norm_groups = 4
    icfg.model.enc_res_blocks = icfg.model.dec_res_blocks = icfg.model.mid_blocks = 0
    icfg.quantizer.codebook_size = image_codebook
    icfg.quantizer.kmeans_init = False
    image = ImageTokenizer(icfg).eval()
    acfg = AudioTokenizerConfig(channels=4, max_channels=8, strides=[4, 5, 8, 10], latent_dim=8, n_q=audio_n_q,
                                codebook_size=audio_codebook, kmeans_init=False, sample_rate=16000,
                                res_dilations=[1])
    audio = AudioTokenizer(acfg).eval()
    space = build_space(text, image, audio)
    mcfg = ModelConfig(vocab_size=space.vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                       max_seq_len=max_seq_len, **(model_overrides or {}))
    model = Transformer(mcfg).eval()
    return Bundle(model, Tokenizers(text, image, audio, space, Stream(space, text)))

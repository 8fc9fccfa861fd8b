"""Shared fixtures: small tokenizers trained once per test session (CPU, seconds), and a tiny
learnable token corpus for training tests.

The corpus mimics the demo world's document kinds with a deterministic mapping from caption to
image codes, audio codes and box, so a 2-layer, 32-wide model learns something in a few dozen
steps on one CPU thread.
"""

from __future__ import annotations

import os
import pydoc_data.topics
import sys

import numpy as np
import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: thread hand-offs cost more than the math."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CAPTIONS = [
    "a small red circle at the top left",
    "a large blue square in the center and a small green triangle at the bottom right",
    "there is a small yellow triangle at the left",
    "a picture of a large purple circle at the top",
    "the orange square",
    "say: a small red circle at the right",
]


@pytest.fixture(scope="session")
def text_tokenizer():
    from anymodal.tokenizers.text import TextTokenizerConfig, train_text_tokenizer

    texts = list(pydoc_data.topics.topics.values())[:60] + CAPTIONS * 20
    return train_text_tokenizer(TextTokenizerConfig(vocab_size=800, loc_bins=64), texts)


@pytest.fixture(scope="session")
def token_space(text_tokenizer):
    from anymodal.tokenizers.token_space import TokenSpace

    return TokenSpace.build(text_tokenizer, image_codebook_size=32, image_grid=(4, 4), audio_n_q=3,
                            audio_codebook_size=16, audio_frame_rate=25.0, audio_sample_rate=16000)


@pytest.fixture(scope="session")
def stream(token_space, text_tokenizer):
    from anymodal.tokenizers.stream import Stream

    return Stream(token_space, text_tokenizer)


@pytest.fixture(scope="session")
def tiny_tokset(tmp_path_factory):
    """A real tokenizer set folder (tiny, untrained image/audio codecs: codes are still
    deterministic) and the Tokenizers loaded back from it."""
    from anymodal.sample.bundle import tiny_bundle
    from anymodal.tokenizers import load_tokenizers

    t = tiny_bundle().tok
    out = tmp_path_factory.mktemp("tokset")
    t.text.save(out / "text")
    t.image.save(out / "image")
    t.audio.save(out / "audio")
    t.space.save(out / "token_space.json")
    return out, load_tokenizers(out)

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
PROSE = "the quick brown fox jumps over the lazy dog. python is a programming language."

# settings every training test shares: tiny model, one thread, no MFU measurement
_TINY = ["model_preset=", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "seq_len=64", "micro_batch=4",
        "threads=1", "peak_flops=1e10", "progress=false", "lr=3e-3", "warmup=5", "cond_dropout=0.2"]


def tiny_corpus(tok, n: int = 240, seed: int = 0):
    from anymodal.tokenizers.stream import Audio, Box, Image, Text

    sp, st = tok.space, tok.stream
    h, w = sp.image_grid
    rng = np.random.default_rng(seed)
    kinds = ["t2i", "i2t", "tts", "asr", "ground", "prose"]
    for i in range(n):
        c, s = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
        cap = f"a {COLOURS[c]} {SHAPES[s]}"
        img = Image((np.arange(h * w).reshape(h, w) * (c + 1) + 3 * s) % sp.image_codebook_size)
        frames = np.stack([np.full(3 + s, c), np.full(3 + s, s)] + [np.zeros(3 + s, int)] * (sp.audio_n_q - 2), 1)
        aud = Audio(frames % sp.audio_codebook_size)
        box = Box(0.1 * c, 0.1 * s, 0.5 + 0.1 * c, 0.5 + 0.1 * s)
        kind = kinds[i % len(kinds)]
        segs = {"t2i": [Text(cap), img], "i2t": [img, Text(cap)], "tts": [Text("say: " + cap), aud],
                "asr": [aud, Text(cap)], "ground": [img, Text(f"<ref>the {COLOURS[c]} {SHAPES[s]}</ref>"), box],
                "prose": [Text(PROSE)]}[kind]
        ids, mod = st.encode(segs)
        yield ids, mod, kind


@pytest.fixture(scope="session")
def tiny_tokens(tiny_tokset, tmp_path_factory):
    """Token shards of the tiny corpus, prepared with the tiny tokenizer set."""
    from anymodal.data.prepare import write_token_dataset

    tok_dir, tok = tiny_tokset
    out = tmp_path_factory.mktemp("tokens")
    write_token_dataset(out, tok.space, tiny_corpus(tok), docs_per_shard=100, tokenizers=tok_dir)
    return out


@pytest.fixture(scope="session")
def tiny_tokens_b(tiny_tokset, tmp_path_factory):
    """A second, smaller token folder of the same token space (other documents): a mixture's
    second source."""
    from anymodal.data.prepare import write_token_dataset

    tok_dir, tok = tiny_tokset
    out = tmp_path_factory.mktemp("tokens_b")
    write_token_dataset(out, tok.space, tiny_corpus(tok, n=120, seed=1), tokenizers=tok_dir)
    return out


@pytest.fixture
def mix_args(tiny_tokens, tiny_tokens_b) -> list[str]:
    """Overrides that train on a mixture of the two tiny folders: weights 3:1, no prose, t2i twice."""
    return [f"data=[{{path: {tiny_tokens}, weight: 3, name: world}}, {{path: {tiny_tokens_b}, weight: 1}}]",
            "kind_weights={prose: 0, t2i: 2}"]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """The tiny-run settings alone (for module-scoped fixtures that train once)."""
    return list(_TINY)


@pytest.fixture
def tiny_args(tiny_tokens, tmp_path) -> list[str]:
    """Overrides for a tiny run on the tiny corpus, in a fresh run dir."""
    return [*_TINY, f"data={tiny_tokens}", f"run_dir={tmp_path / 'run'}"]


@pytest.fixture
def cli_env() -> dict:
    """Environment for `anymodal` subprocesses (a clean torch.distributed setup, one thread)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)  # an in-process run of this session set these for itself
    for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env

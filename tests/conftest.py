"""Shared fixtures: small tokenizers trained once per test session (CPU, seconds)."""

from __future__ import annotations

import os
import pydoc_data.topics

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

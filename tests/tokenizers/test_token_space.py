"""TokenSpace: contiguous ranges, modality table, masks, save/load and mismatch errors."""

import json

import numpy as np
import pytest
import torch

from anymodal.errors import UserError
from anymodal.modality import Modality
from anymodal.tokenizers.token_space import TokenSpace


def test_ranges_are_contiguous_and_padded(token_space, text_tokenizer):
    s = token_space
    assert s.image_offset == text_tokenizer.vocab_size
    assert s.audio_offset == s.image_offset + 32
    assert s.used_size == s.audio_offset + 3 * 16
    assert s.vocab_size % 64 == 0 and s.vocab_size >= s.used_size > s.vocab_size - 64
    assert s.audio_id(2, 15) == s.used_size - 1
    assert s.audio_range(1) == (s.audio_offset + 16, s.audio_offset + 32)


def test_modality_of_numpy_and_torch(token_space):
    s = token_space
    ids = np.array([s.bos, 100, s.loc_id(5), s.image_id(0), s.image_id(31), s.audio_id(0, 0), s.audio_id(2, 3), s.eos])
    want = [Modality.TEXT, Modality.TEXT, Modality.LOC, Modality.IMAGE, Modality.IMAGE, Modality.AUDIO,
            Modality.AUDIO, Modality.TEXT]
    assert s.modality_of(ids).tolist() == [int(m) for m in want]
    assert s.modality_of(torch.from_numpy(ids).view(2, 4)).flatten().tolist() == [int(m) for m in want]


def test_masks_partition_the_used_vocab(token_space):
    s = token_space
    masks = torch.stack([s.mask(m) for m in Modality])
    assert masks.sum(0)[: s.used_size].eq(1).all()  # every real id in exactly one modality
    assert not masks[:, s.used_size :].any()  # padding is in none
    assert masks[Modality.IMAGE].sum() == 32 and masks[Modality.LOC].sum() == 64
    assert masks[Modality.AUDIO].sum() == 48


def test_save_load_and_mismatch(tmp_path, token_space, text_tokenizer):
    token_space.save(tmp_path)
    loaded = TokenSpace.load(tmp_path / "token_space.json")
    assert loaded == token_space
    loaded.check_same(token_space)
    other = TokenSpace.build(text_tokenizer, image_codebook_size=64, image_grid=(4, 4))
    with pytest.raises(UserError, match="image_codebook_size"):
        other.check_same(token_space, "run vs tokenizers")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no token space"):
        TokenSpace.load(tmp_path)
    (tmp_path / "token_space.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(UserError, match="missing fields"):
        TokenSpace.load(tmp_path)
    (tmp_path / "token_space.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid token space"):
        TokenSpace.load(tmp_path)

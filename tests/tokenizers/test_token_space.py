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
    assert s.eor == s.audio_offset + 3 * 16 and s.image_size_offset == s.eor + 1
    assert s.used_size == s.image_size_offset + s.image_max_side
    assert s.vocab_size % 64 == 0 and s.vocab_size >= s.used_size > s.vocab_size - 64
    assert s.audio_id(2, 15) == s.eor - 1 and s.size_id(s.image_max_side) == s.used_size - 1
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
    # image codes, <eor> and the size tokens
    assert masks[Modality.IMAGE].sum() == 32 + 1 + s.image_max_side and masks[Modality.LOC].sum() == 64
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


def test_versions(tmp_path, token_space, text_tokenizer):
    # a version-1 file (no row or size tokens) loads as the square layout
    d = token_space.to_dict()
    for k in ("eor", "image_size_offset", "image_max_side"):
        d.pop(k)
    d["version"] = 1
    (tmp_path / "token_space.json").write_text(json.dumps(d))
    old = TokenSpace.load(tmp_path)
    assert not old.any_aspect and old.image_span() == 16 + 2
    assert old.used_size == old.audio_offset + 3 * 16
    with pytest.raises(UserError, match="version"):
        old.check_same(token_space)
    d["version"] = 3
    (tmp_path / "token_space.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="version 3 is newer"):
        TokenSpace.load(tmp_path)
    with pytest.raises(UserError, match="side of 0 codes"):
        token_space.size_id(0)
    with pytest.raises(UserError, match="image_max_side"):
        TokenSpace.build(text_tokenizer, image_codebook_size=32, image_grid=(4, 80))
    assert token_space.image_span(2, 3) == 4 + 2 * 4

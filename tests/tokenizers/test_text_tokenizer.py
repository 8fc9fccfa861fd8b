"""Text tokenizer: exact round trips for any Unicode, specials and coordinate pieces."""

import json

import pytest

from anymodal.errors import UserError
from anymodal.tokenizers.text import (
    TextTokenizer,
    TextTokenizerConfig,
    decode_file,
    encode_file,
    train_text_tokenizer,
)
from anymodal.tokenizers.token_space import SPECIAL_PIECES

ROUND_TRIP = [
    "",
    " ",
    "  leading and  double  spaces  ",
    "a small red circle at the top left",
    "héllo wörld — ünïcode",
    "日本語のテキストと中文",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧",
    "tab\tnewline\ncrlf\r\n",
    "\x00\x01 control",
    "\u2581literal sentencepiece mark\u2581 \u2581",
    "<s></s><pad><unk> look like specials but are text",
    "<ref>the blue square</ref><box><loc_0><loc_63></box>",
    "ﬁ ligature ＡＢＣ fullwidth ① circled",
    "Ω≈ç√∫ ∑ zalgo z̴̡a̷l̶g̸o",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_any_unicode_round_trips(text_tokenizer, text):
    ids = text_tokenizer.encode(text)
    assert all(0 <= i < text_tokenizer.vocab_size for i in ids)
    assert text_tokenizer.decode(ids) == text


def test_no_unk_and_byte_fallback(text_tokenizer):
    ids = text_tokenizer.encode("𓀀 hieroglyph")  # surely not a learned piece
    assert text_tokenizer.special_ids()["unk"] not in ids
    assert any(text_tokenizer.piece(i).startswith("<0x") for i in ids)


def test_specials_and_loc_pieces_are_single_tokens(text_tokenizer):
    sp = text_tokenizer.special_ids()
    for name, piece in SPECIAL_PIECES.items():
        assert text_tokenizer.encode(piece) == [sp[name]]
    assert text_tokenizer.loc_bins == 64
    for b in (0, 17, 63):
        assert text_tokenizer.encode(f"<loc_{b}>") == [text_tokenizer.loc_offset + b]
    assert (sp["unk"], sp["bos"], sp["eos"], sp["pad"]) == (0, 1, 2, 3)
    # frequent words become single pieces: the tokenizer really learned merges
    phrase = "a small red circle at the top left"
    assert len(text_tokenizer.encode(phrase)) < 0.6 * len(phrase.encode())


def test_save_load_identical(tmp_path, text_tokenizer):
    text_tokenizer.save(tmp_path)
    again = TextTokenizer.load(tmp_path)
    assert again.fingerprint == text_tokenizer.fingerprint
    s = "the purple triangle at the top right"
    assert again.encode(s) == text_tokenizer.encode(s)


def test_too_small_vocab_is_user_error():
    with pytest.raises(UserError, match="too small"):
        train_text_tokenizer(TextTokenizerConfig(vocab_size=300, loc_bins=64), ["hello world"])


def test_file_encode_decode(tmp_path, text_tokenizer):
    text_tokenizer.save(tmp_path / "tok")
    (tmp_path / "in.txt").write_text("héllo <box><loc_1><loc_2><loc_3><loc_4></box>", encoding="utf-8")
    encode_file(str(tmp_path / "tok"), str(tmp_path / "in.txt"), str(tmp_path / "ids.json"))
    assert json.loads((tmp_path / "ids.json").read_text())["ids"]
    decode_file(str(tmp_path / "tok"), str(tmp_path / "ids.json"), str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == (tmp_path / "in.txt").read_text(encoding="utf-8")
    (tmp_path / "bad.json").write_text(json.dumps([10**9]))
    with pytest.raises(UserError, match="outside"):
        decode_file(str(tmp_path / "tok"), str(tmp_path / "bad.json"), str(tmp_path / "o.txt"))

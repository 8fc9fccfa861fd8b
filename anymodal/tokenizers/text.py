"""Text tokenizer: sentencepiece BPE with byte fallback, stream specials and coordinate pieces.

Settings that make any Unicode string round-trip exactly: identity normalization (no NFKC),
no dummy prefix, no whitespace collapsing, byte fallback (nothing is ever UNK). Sentencepiece
shows spaces as U+2581 internally, so a literal U+2581 in the input would come back as a space;
`encode` sends that one character through its byte pieces instead.

Special pieces (`<boi>`, `<box>`, `<ref>`…) and `<loc_0>…<loc_{B-1}>` are user-defined symbols:
they are matched in input text, which is how prompts such as `<ref>the blue square</ref>` work.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from ..errors import UserError
from ..fileio import write_atomic
from .token_space import SPECIAL_PIECES, loc_piece

SP_MARK = "\u2581"


@dataclass
class TextTokenizerConfig:
    vocab_size: int = 8000  # total pieces: specials + <loc_*> + 256 bytes + learned merges
    loc_bins: int = 1000  # B coordinate pieces <loc_0>..<loc_{B-1}>
    character_coverage: float = 1.0
    max_sentences: int = 200_000  # sentences sampled for training
    max_sentence_length: int = 8192
    input: str = ""  # raw shards (path/glob/brace) or .txt files, comma-separated (required)
    seed: int = 0


class TextTokenizer:
    """Load/encode/decode a trained sentencepiece model plus its stream specials."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        self.vocab_size = self.sp.get_piece_size()
        self._specials = {"unk": self.sp.unk_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id(),
                          "pad": self.sp.pad_id()}
        for name, piece in SPECIAL_PIECES.items():
            self._specials[name] = self._require(piece)
        self.loc_offset = self._require(loc_piece(0))
        n = 0
        while self.sp.piece_to_id(loc_piece(n)) == self.loc_offset + n and n < self.vocab_size:
            n += 1
        self.loc_bins = n
        self._user_ids = {self._specials[name] for name in SPECIAL_PIECES} | set(
            range(self.loc_offset, self.loc_offset + n))
        self._mark_bytes = [self._require(f"<0x{b:02X}>") for b in SP_MARK.encode("utf-8")]

    def _require(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() or self.sp.id_to_piece(i) != piece:
            raise UserError(f"text tokenizer lacks the piece {piece!r}")
        return i

    # ---- persistence ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        model = path / "text.model" if path.is_dir() else path
        if not model.is_file():
            raise UserError(f"no text tokenizer at {path} (expected text.model)")
        return cls(model.read_bytes())

    def save(self, out: str | Path) -> None:
        write_atomic(Path(out) / "text.model", self.proto)

    # ---- ids -----------------------------------------------------------------------------------
    def special_ids(self) -> dict[str, int]:
        return dict(self._specials)

    def encode(self, text: str) -> list[int]:
        if SP_MARK not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SP_MARK)):
            if i:
                ids.extend(self._mark_bytes)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        # Decode in runs split at the U+2581 byte sequence so it is not turned into a space.
        out, start, k = [], 0, len(self._mark_bytes)
        i = 0
        while i <= len(ids) - k:
            if ids[i : i + k] == self._mark_bytes:
                out.append(self.sp.decode(ids[start:i]))
                out.append(SP_MARK)
                i += k
                start = i
            else:
                i += 1
        out.append(self.sp.decode(ids[start:]))
        return "".join(out)

    def is_user_defined(self, i: int) -> bool:
        """Whether piece `i` is matched whole in input text (a stream special or a `<loc_*>`)."""
        return int(i) in self._user_ids

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def train_text_tokenizer(cfg: TextTokenizerConfig, sentences: Iterable[str]) -> TextTokenizer:
    """Train a BPE model on `sentences` (one training sentence per line of each string)."""

    def lines():
        n = 0
        for s in sentences:
            for line in s.splitlines():
                if line.strip():
                    yield line[: cfg.max_sentence_length]
                    n += 1
                    if n >= cfg.max_sentences:
                        return

    user_symbols = list(SPECIAL_PIECES.values()) + [loc_piece(i) for i in range(cfg.loc_bins)]
    min_size = len(user_symbols) + 4 + 256 + 1
    if cfg.vocab_size < min_size:
        raise UserError(f"text vocab_size {cfg.vocab_size} is too small: needs > {min_size} "
                        f"(specials, {cfg.loc_bins} loc pieces, 256 bytes)")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=buf,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            hard_vocab_limit=False,
            character_coverage=cfg.character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            user_defined_symbols=user_symbols,
            max_sentence_length=cfg.max_sentence_length,
            input_sentence_size=cfg.max_sentences,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=100_000,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from None
    return TextTokenizer(buf.getvalue())


def encode_file(tok_dir: str, in_path: str, out_path: str) -> None:
    """Text file -> JSON list of ids."""
    tok = TextTokenizer.load(tok_dir)
    try:
        text = Path(in_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read text from {in_path}: {e}") from None
    Path(out_path).write_text(json.dumps({"ids": tok.encode(text)}))


def decode_file(tok_dir: str, in_path: str, out_path: str) -> None:
    """JSON ids (a list or {"ids": [...]}) -> text file."""
    tok = TextTokenizer.load(tok_dir)
    try:
        data = json.loads(Path(in_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read ids from {in_path}: {e}") from None
    ids = data["ids"] if isinstance(data, dict) and "ids" in data else data
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise UserError(f"{in_path} must hold a list of integer ids")
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise UserError(f"id {bad[0]} is outside the text vocabulary [0, {tok.vocab_size})")
    Path(out_path).write_text(tok.decode(ids), encoding="utf-8")


__all__ = ["TextTokenizer", "TextTokenizerConfig", "train_text_tokenizer", "encode_file", "decode_file"]

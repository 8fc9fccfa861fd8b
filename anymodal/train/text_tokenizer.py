"""Train the text tokenizer (sentencepiece BPE) from raw shards or plain .txt files."""

from __future__ import annotations

import glob
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import load_config, save_config
from ..data.reader import RecordCounter, iter_documents
from ..errors import UserError
from ..tokenizers.text import TextTokenizer, TextTokenizerConfig, train_text_tokenizer


def iter_texts(spec: str) -> Iterator[str]:
    """Texts from .txt files (one sentence per line) or from the text segments of raw shards."""
    if not spec:
        raise UserError("text tokenizer needs input=PATH (raw shards or .txt files)")
    parts = [p for p in spec.split(",") if p]
    txt = [p for p in parts if p.endswith(".txt")]
    shards = [p for p in parts if not p.endswith(".txt")]
    for pattern in txt:
        files = sorted(glob.glob(pattern)) or [pattern]
        for f in files:
            try:
                yield Path(f).read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise UserError(f"cannot read {f}: {e.strerror}") from None
    if shards:
        counter = RecordCounter()
        for doc in iter_documents(shards, counter=counter, decode_media=False):
            for seg in doc.segments:
                if "text" in seg:
                    yield seg["text"]
        counter.report()


def train_from_cli(config: str, overrides: list[str], out: str, resume: bool = False) -> TextTokenizer:
    cfg = load_config(TextTokenizerConfig, config, overrides)
    out_dir = Path(out)
    t0 = time.time()
    tok = train_text_tokenizer(cfg, iter_texts(cfg.input))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(out_dir)
    save_config(cfg, out_dir / "config.yaml", extra={"kind": "text"})
    print(f"text tokenizer: {tok.vocab_size} pieces ({cfg.loc_bins} loc) -> {out_dir} in {time.time() - t0:.1f}s")
    return tok

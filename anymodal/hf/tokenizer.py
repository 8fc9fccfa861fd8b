"""Our sentencepiece text tokenizer as a Hugging Face `tokenizers` tokenizer (for `AutoTokenizer`).

The sentencepiece model is BPE with identity normalization, no dummy prefix, split digits, byte
fallback and user-defined pieces (`<boi>`, `<ref>`, `<loc_*>`, …), so the conversion is exact:
- vocabulary: every piece at its id; the control pieces (`<unk> <s> </s> <pad>`) and the
  user-defined ones become added tokens, matched in the input text as sentencepiece matches them;
- merges: sentencepiece BPE merges, at each step, the adjacent pair whose joined piece scores
  highest; a merge list ranked by the joined piece's score does the same in `tokenizers`' BPE;
- spaces become U+2581 before the model and again spaces after it; digits are split one by one.
The export test checks that both encode the demo world's texts and real prose to the same ids.
"""

from __future__ import annotations

from ..tokenizers.text import SP_MARK, TextTokenizer


def _vocab_and_merges(text: TextTokenizer) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """(piece -> id for the BPE model, merges best first, the pieces matched whole in text)."""
    sp = text.sp
    vocab: dict[str, int] = {}
    whole: list[str] = []
    scores: dict[str, float] = {}
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        vocab[piece] = i
        if sp.is_control(i) or sp.is_unknown(i) or text.is_user_defined(i):
            whole.append(piece)
        elif not sp.is_byte(i) and not sp.is_unused(i):
            scores[piece] = sp.get_score(i)
    merges: list[tuple[float, int, int, str, str]] = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges], whole


def hf_text_tokenizer(text: TextTokenizer):
    """A `transformers.PreTrainedTokenizerFast` that encodes and decodes as `text` does."""
    from tokenizers import (  # optional: the anymodal[hf] extra
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )
    from transformers import PreTrainedTokenizerFast  # optional: the anymodal[hf] extra

    vocab, merges, whole = _vocab_and_merges(text)
    specials = text.special_ids()
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=text.piece(specials["unk"]), byte_fallback=True,
                     fuse_unk=True)
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Replace(" ", SP_MARK)
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")
    tk.decoder = decoders.Sequence([decoders.Replace(SP_MARK, " "), decoders.ByteFallback(), decoders.Fuse()])
    control = {text.piece(specials[k]) for k in ("unk", "bos", "eos", "pad")}
    tk.add_tokens([AddedToken(p, special=p in control, normalized=False) for p in whole])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=text.piece(specials["bos"]), eos_token=text.piece(specials["eos"]),
        unk_token=text.piece(specials["unk"]), pad_token=text.piece(specials["pad"]),
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # sentencepiece reads "<s>" typed in text as characters, not as <s>
    )

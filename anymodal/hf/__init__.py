"""Hugging Face interchange: export a model to Chameleon format, start training from one.

- `export.export_hf`: a bundle -> a folder `ChameleonForConditionalGeneration.from_pretrained` loads;
- `tokenizer.hf_text_tokenizer`: our sentencepiece tokenizer as a `tokenizers` one (`AutoTokenizer`);
- `grammar.StreamGrammar`: the stream grammar as a logits processor for `generate`;
- `load.read_hf_folder`: a Chameleon-format folder -> our weights (`anymodal train init_from=DIR`).
The weight and config mapping itself is pure math in `anymodal.model.hf`.
"""

from .grammar import StreamGrammar

__all__ = ["StreamGrammar"]

"""`anymodal export --format hf`: a model bundle -> a Hugging Face Chameleon folder.

    DIR/config.json                  ChameleonConfig (sizes, QK-Norm, swin/pre, rope theta, special ids)
                                     plus `boi_token_id`, `eoi_token_id`, `image_token_range` and an
                                     `anymodal` block: the whole token space and what HF cannot hold
                                     (any-aspect spaces: `eor_token_id`, `image_size_token_range`,
                                     `image_max_tokens`)
    DIR/model.safetensors            the weights in HF's names (or model-0000i-of-0000n.safetensors
                                     and model.safetensors.index.json above `max_shard_size`)
    DIR/generation_config.json       <s> </s> <pad>, greedy by default
    DIR/tokenizer.json, tokenizer_config.json   the text tokenizer for `AutoTokenizer`
    DIR/token_space.json, text/ image/ audio/   our tokenizer set: images and audio decode with it
    DIR/README.md                    what is in the folder and how to use it

`ChameleonForConditionalGeneration` holds a VQGAN besides the language model. Ours is a different
image tokenizer (in `image/`), so the folder's `model.vqmodel.*` is the smallest VQ the class
accepts, with zero weights: it lets `from_pretrained` load with no missing weights and must not be
used to encode images. The folder is written beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..fileio import fresh_dir_beside, replace_dir, write_atomic
from ..model.hf import MINIMAL_VQ, check_exportable, hf_config_kwargs, to_hf_state_dict
from ..sample.bundle import load_bundle
from .tokenizer import hf_text_tokenizer

FORMAT_VERSION = 1

README = """# {name}: an anymodal model in Hugging Face Chameleon format

Exported by `anymodal export --format hf` from `{source}` ({params:,} parameters).

```python
import torch
from transformers import AutoTokenizer, ChameleonForConditionalGeneration
from anymodal.hf import StreamGrammar  # optional: keeps images, clips and boxes well formed

model = ChameleonForConditionalGeneration.from_pretrained("{name}")
tok = AutoTokenizer.from_pretrained("{name}")
ids = tok("at the top left a small red circle<boi>", return_tensors="pt").input_ids
{example}
```

{images}

What `transformers` does not represent, and where it lives instead:
- the image tokenizer: `image/` (ours, not Chameleon's VQGAN; `model.vqmodel.*` is a zero
  placeholder so the class loads, never use it to encode images);
- audio: codec codes are ids [{audio_lo}, {audio_hi}) ({audio_n_q} level(s) x {audio_k} codes, frame-major,
  between `<boa>` ({boa}) and `<eoa>` ({eoa})), decoded by `audio/`;
- boxes: `<box>` then four `<loc_*>` pieces (x1 y1 x2 y2, {loc_bins} bins of the image's width and height)
  then `</box>`; they are ordinary text pieces of the tokenizer;
- the stream grammar ({grammar}; whole audio frames; ordered box corners):
  `anymodal.hf.StreamGrammar`, a `LogitsProcessor`.
`token_space.json` (also under `anymodal` in `config.json`) has every range.
"""

# Version-2 token spaces: any grid, stated by two size tokens, rows closed by <eor>.
GRID_EXAMPLE = """h, w = {grid_h}, {grid_w}  # any grid with sides up to {max_side} codes; <size_n> is id {size_lo} + n - 1
ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids, torch.tensor([[{size_lo} + h - 1, {size_lo} + w - 1]])], 1)
out = model.generate(ids, max_new_tokens=h * (w + 1) + 1, do_sample=False,
                     logits_processor=[StreamGrammar.from_folder("{name}")])"""
GRID_IMAGES = """Image codes are ids [{image_lo}, {image_hi}) (code = id - {image_lo}). An image is `<boi>` ({boi}), two
size tokens `<size_h> <size_w>` (ids [{size_lo}, {size_hi}): sides of 1..{max_side} codes), h rows of w codes
each closed by `<eor>` ({eor}), then `<eoi>` ({eoi}). A prompt ending in `<boi>` lets the model choose the
grid (at most {max_tokens} codes); one ending in `<boi> <size_h> <size_w>` fixes it. Write an image's
codes (id - {image_lo}, without the `<eor>`s) as `{{"grid": [h, w], "ids": [...]}}` and decode them with this
folder's image tokenizer: `anymodal tokenizer decode image --tokenizer {name}/image codes.json image.png`."""
GRID_GRAMMAR = "an image's two size tokens,\n  then h rows of exactly w codes and `<eor>`, then `<eoi>`"

# Version-1 token spaces: one square grid, its codes between <boi> and <eoi>.
SQUARE_EXAMPLE = """ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], 1)
out = model.generate(ids, max_new_tokens={image_tokens_plus}, do_sample=False,
                     logits_processor=[StreamGrammar.from_folder("{name}")])"""
SQUARE_IMAGES = """Image codes are ids [{image_lo}, {image_hi}) (code = id - {image_lo}), {grid_h} x {grid_w} per image
between `<boi>` ({boi}) and `<eoi>` ({eoi}); write the {grid_h}x{grid_w} codes (id - {image_lo}) as `{{"ids": [...]}}` and
decode them with this folder's image tokenizer:
`anymodal tokenizer decode image --tokenizer {name}/image codes.json image.png`."""
SQUARE_GRAMMAR = "exactly {grid_h}x{grid_w} codes per image"


def _readme(name: str, source, params: int, space, max_tokens: int | None) -> str:
    """The folder's README.md, for the image layout of its token space."""
    a_lo, a_hi = space.audio_range()
    size_lo, size_hi = space.size_range() if space.any_aspect else (0, 0)
    fields = dict(name=name, source=source, params=params, image_lo=space.image_offset,
                  image_hi=space.image_offset + space.image_codebook_size, grid_h=space.image_grid[0],
                  grid_w=space.image_grid[1], image_tokens_plus=space.image_tokens + 1, boi=space.boi, eoi=space.eoi,
                  eor=space.eor, size_lo=size_lo, size_hi=size_hi, max_side=space.image_max_side,
                  max_tokens=max_tokens or space.image_tokens, audio_lo=a_lo, audio_hi=a_hi,
                  audio_n_q=space.audio_n_q, audio_k=space.audio_codebook_size, boa=space.boa, eoa=space.eoa,
                  loc_bins=space.loc_bins)
    example, images, grammar = ((GRID_EXAMPLE, GRID_IMAGES, GRID_GRAMMAR) if space.any_aspect
                                else (SQUARE_EXAMPLE, SQUARE_IMAGES, SQUARE_GRAMMAR))
    return README.format(example=example.format(**fields), images=images.format(**fields),
                         grammar=grammar.format(**fields), **fields)


def _hf_config(cfg, space, params: int, image_max_tokens: int | None = None):
    import transformers  # optional: the anymodal[hf] extra

    lo, hi = space.image_range()
    # version 2: what `StreamGrammar.from_folder` and readers of the stream need besides the ranges
    grid = dict(eor_token_id=space.eor, image_size_token_range=list(space.size_range()),
                image_max_tokens=image_max_tokens or space.image_tokens) if space.any_aspect else {}
    not_held = ["the image tokenizer (image/; model.vqmodel is a zero placeholder)",
                "audio codec tokens and their tokenizer (audio/)",
                "the stream grammar (anymodal.hf.StreamGrammar)"]
    return transformers.ChameleonConfig(
        **hf_config_kwargs(cfg), vq_config=MINIMAL_VQ,
        bos_token_id=space.bos, eos_token_id=space.eos, pad_token_id=space.pad,
        boi_token_id=space.boi, eoi_token_id=space.eoi, image_token_range=[lo, hi],
        anymodal={"format_version": FORMAT_VERSION, "token_space": space.to_dict(), "params": params,
                  "image_grid": list(space.image_grid), "audio_token_range": list(space.audio_range()),
                  "loc_token_range": list(space.loc_range()), "not_in_transformers": not_held, **grid},
    )


def _placeholder_vq_weights(hf_config) -> dict[str, torch.Tensor]:
    import transformers  # optional: the anymodal[hf] extra

    with torch.device("meta"):
        vq = transformers.ChameleonVQVAE(hf_config.vq_config)
    return {f"model.vqmodel.{k}": torch.zeros(v.shape, dtype=torch.float32) for k, v in vq.state_dict().items()}


def _save_weights(state: dict[str, torch.Tensor], out: Path, max_shard_size: int | str) -> int:
    """model.safetensors, or shards plus the index `from_pretrained` reads; returns the shard count."""
    from huggingface_hub import split_torch_state_dict_into_shards  # optional: the anymodal[hf] extra

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": split.tensor_to_filename}
        write_atomic(out / "model.safetensors.index.json", json.dumps(index, indent=1))
    return len(split.filename_to_tensors)


def export_hf(bundle_dir: str | Path, out: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write the Hugging Face folder of a model bundle (`anymodal export` writes bundles)."""
    try:
        import transformers  # optional: the anymodal[hf] extra
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'anymodal[hf]'") from None

    bundle_dir, out = Path(bundle_dir), Path(out)
    b = load_bundle(bundle_dir, device="cpu")
    if b.model.cfg.blind_decode:
        print(f"[export] note: {bundle_dir} reads the codes it generates without their colour (blind_decode); "
              "Chameleon has no such reading, so the Hugging Face model reads them whole", file=sys.stderr)
    model = b.model.fold_code_factors()  # Chameleon: one table row per id
    cfg, space = model.cfg, b.space
    try:
        check_exportable(cfg)
    except ValueError as e:
        raise UserError(f"cannot export {bundle_dir} to Hugging Face format: {e}") from None
    params = model.num_params()
    hf_config = _hf_config(cfg, space, params, b.max_image_tokens)
    state = to_hf_state_dict(model.state_dict(), cfg)
    if cfg.tie_embeddings:  # one tensor under two names: safetensors stores each name's own copy
        state["lm_head.weight"] = state["lm_head.weight"].clone()
    state.update(_placeholder_vq_weights(hf_config))

    tmp = fresh_dir_beside(out, "tmp-export")
    hf_config.save_pretrained(tmp)
    shards = _save_weights(state, tmp, max_shard_size)
    transformers.GenerationConfig(bos_token_id=space.bos, eos_token_id=space.eos, pad_token_id=space.pad,
                                  do_sample=False).save_pretrained(tmp)
    hf_text_tokenizer(b.tok.text).save_pretrained(tmp)
    b.tok.text.save(tmp / "text")
    for name in ("image", "audio"):
        if (bundle_dir / name).is_dir():
            shutil.copytree(bundle_dir / name, tmp / name)
    space.save(tmp / "token_space.json")
    write_atomic(tmp / "README.md", _readme(out.name, bundle_dir, params, space, b.max_image_tokens))
    replace_dir(tmp, out)
    print(f"[export] {bundle_dir} -> {out} (Hugging Face Chameleon, {params:,} parameters, "
          f"{shards} weight file{'s' if shards > 1 else ''})", file=sys.stderr)
    return out

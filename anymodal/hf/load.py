"""Start training from a Hugging Face Chameleon folder (`anymodal train … init_from=DIR`).

The folder's `config.json` fixes the model's shape; its language-model weights are mapped back
with `anymodal.model.hf.from_hf_state_dict` (the VQGAN's, if any, are ignored). Embedding and
output rows are ids, so they are only meaningful under the same token space:
- `init_vocab=strict` (default): the folder must carry a `token_space.json` (an anymodal export)
  equal to the run's; otherwise the run is refused with one line naming what differs;
- `init_vocab=map`: rows are matched by what they stand for: text pieces by their string (the
  folder's `tokenizer.json`), image and audio codes by their index when the folder's token space
  has codebooks of the same size, vocabulary padding by its index. Rows with no match keep their
  fresh initialization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..model.hf import from_hf_state_dict
from ..tokenizers.token_space import TokenSpace

INIT_VOCAB = ("strict", "map")


@dataclass
class HFCheckpoint:
    path: Path
    config: dict  # config.json
    state: dict[str, torch.Tensor]  # language-model weights, HF names
    space: TokenSpace | None  # token_space.json, when the folder is an anymodal export
    pieces: dict[str, int] | None  # text piece -> id (tokenizer.json), when present


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"init_from: {path} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"init_from: {cfg_file} is not valid JSON: {e}") from None
    if config.get("model_type") != "chameleon":
        raise UserError(f"init_from: {path} holds a {config.get('model_type')!r} model; only Chameleon-format "
                        f"folders can be loaded")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UserError(f"init_from: {path} uses attention or MLP biases, which anymodal's model does not have")
    return config


def model_shape(config: dict) -> dict:
    """The ModelConfig fields a Chameleon config.json fixes."""
    rope = config.get("rope_parameters") or {}
    return {
        "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "head_dim": None, "mlp_hidden": config["intermediate_size"],
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "norm_eps": config.get("rms_norm_eps", 1e-5),
        "norm_placement": "swin" if config.get("swin_norm") else "pre", "qk_norm": True,
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "max_seq_len": config.get("max_position_embeddings", 2048),
    }


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"init_from: {path} has no model.safetensors (or its index); only safetensors weights load")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise UserError(f"init_from: {path / name} is missing (named by the index)")
        part = load_file(str(path / name), device="cpu")
        state.update({k: v.float() for k, v in part.items() if not k.startswith("model.vqmodel.")})
    return state


def _read_pieces(path: Path) -> dict[str, int] | None:
    tj = path / "tokenizer.json"
    if not tj.is_file():
        return None
    data = json.loads(tj.read_text())
    pieces = dict(data.get("model", {}).get("vocab") or {})
    pieces.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return pieces


def read_hf_folder(path: str | Path) -> HFCheckpoint:
    path = Path(path)
    config = read_config(path)
    space = TokenSpace.load(path) if (path / "token_space.json").is_file() else None
    return HFCheckpoint(path, config, _read_weights(path), space, _read_pieces(path))


def _row_map(ck: HFCheckpoint, space: TokenSpace, text) -> tuple[list[int], list[int], dict[str, str]]:
    """(our ids, the folder's ids) of the rows that stand for the same token; counts per range."""
    ours: list[int] = []
    theirs: list[int] = []
    counts: dict[str, str] = {}
    if ck.pieces is None:
        raise UserError(f"init_vocab=map: {ck.path} has no tokenizer.json to match text pieces with")
    n = 0
    for i in range(space.text_size):
        j = ck.pieces.get(text.piece(i))
        if j is not None:
            ours.append(i)
            theirs.append(j)
            n += 1
    counts["text"] = f"{n}/{space.text_size}"
    src = ck.space
    for name, size, off, src_size, src_off in (
        ("image", space.image_codebook_size, space.image_offset,
         src.image_codebook_size if src else 0, src.image_offset if src else 0),
        ("audio", space.audio_n_q * space.audio_codebook_size, space.audio_offset,
         src.audio_n_q * src.audio_codebook_size if src else 0, src.audio_offset if src else 0),
    ):
        same = src is not None and size == src_size and (
            name == "image" or space.audio_codebook_size == src.audio_codebook_size)
        if same and size:
            ours.extend(range(off, off + size))
            theirs.extend(range(src_off, src_off + size))
        counts[name] = f"{size if same else 0}/{size}"
    if space.any_aspect:  # <eor> and <size_n> stand for the same thing in every any-aspect space
        sides = min(space.image_max_side, src.image_max_side) if src is not None and src.any_aspect else 0
        if sides:
            ours.extend([space.eor, *range(space.image_size_offset, space.image_size_offset + sides)])
            theirs.extend([src.eor, *range(src.image_size_offset, src.image_size_offset + sides)])
        counts["image layout"] = f"{sides + 1 if sides else 0}/{space.image_max_side + 1}"
    if src is not None:  # ids that stand for nothing (vocab padding) on both sides: their output rows
        pad = min(space.vocab_size - space.used_size, src.vocab_size - src.used_size)
        ours.extend(range(space.used_size, space.used_size + pad))
        theirs.extend(range(src.used_size, src.used_size + pad))
    return ours, theirs, counts


def init_from_hf(model, ck: HFCheckpoint, space: TokenSpace, init_vocab: str = "strict", text=None) -> str:
    """Load `ck` into `model` (a fresh Transformer of its shape); returns a one-line summary."""
    cfg = model.cfg
    try:
        state = from_hf_state_dict(ck.state, cfg)
    except KeyError as e:
        raise UserError(f"init_from: {ck.path} lacks the weight {e.args[0]} for this model shape") from None
    except ValueError as e:
        raise UserError(f"init_from: {e}") from None
    emb, head = state.pop("tok_emb.weight"), state.pop("head.weight")
    if init_vocab == "strict":
        if ck.space is None:
            raise UserError(f"init_from: {ck.path} has no token_space.json, so its ids cannot be checked against "
                            f"this run's; pass init_vocab=map to match rows by token")
        diff = ck.space.differences(space)
        if diff:
            raise UserError(f"init_from: {ck.path}'s token space differs from this run's ({'; '.join(diff[:3])}); "
                            f"pass init_vocab=map to match rows by token")
        state["tok_emb.weight"], state["head.weight"] = emb, head
        summary = "every row"
    else:
        if text is None:
            raise UserError("init_vocab=map needs the run's text tokenizer (set tokenizers=DIR)")
        ours, theirs, counts = _row_map(ck, space, text)
        new_emb, new_head = model.tok_emb.weight.detach().clone(), model.head.weight.detach().clone()
        rows = torch.tensor(theirs, dtype=torch.long)
        if len(ours) and int(rows.max()) >= emb.shape[0]:
            raise UserError(f"init_from: {ck.path}'s tokenizer names ids beyond its {emb.shape[0]} embedding rows")
        new_emb[ours] = emb[rows]
        new_head[ours] = head[rows]
        state["tok_emb.weight"], state["head.weight"] = new_emb, new_head
        summary = "rows mapped: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    missing, unexpected = model.load_weights(state)
    if missing or unexpected:
        raise UserError(f"init_from: {ck.path} does not fit the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return summary

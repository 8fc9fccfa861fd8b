"""`anymodal export --run DIR --out BUNDLE`: a training run -> a self-contained model bundle.

    BUNDLE/config.yaml          the ModelConfig (activation checkpointing off)
    BUNDLE/model.safetensors    fp32 weights, consolidated from any ZeRO stage
    BUNDLE/token_space.json     the run's token space (checked against the tokenizers copied)
    BUNDLE/text/ image/ audio/  the tokenizer set the data was prepared with
    BUNDLE/train_config.yaml    the run's TrainConfig, for reference
    BUNDLE/export.json          which run and checkpoint step the bundle came from

ZeRO-1/2/3 checkpoints (each rank holding a slice of the fp32 master weights) are merged with
DeepSpeed's `zero_to_fp32` utilities; a stage-0 checkpoint already holds the whole module. The
bundle is written next to its destination and renamed into place, so it appears complete or not
at all. `anymodal.sample.bundle.load_bundle` reads it back.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from ..config import load_config, save_config
from ..data.mixture import parse_sources
from ..errors import ConfigError, UserError
from ..fileio import fresh_dir_beside, replace_dir
from ..modality import TOKENIZER_KINDS
from ..model import ModelConfig, Transformer
from ..tokenizers import load_tokenizers
from ..tokenizers.token_space import TokenSpace
from .checkpoint import CKPT_DIR, latest_checkpoint, list_checkpoints


def consolidate(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model in one checkpoint folder (any ZeRO stage)."""
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import (  # here: deepspeed is slow to import, stage 0 never needs it
            get_fp32_state_dict_from_zero_checkpoint,
        )

        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-parameter progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{ckpt} holds no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def tokenizer_dir(run: Path, given: str | Path | None = None, data=None) -> Path:
    """`given`, or the tokenizer set the run's training data (`data`, default: the run's config)
    was prepared with (from its manifest)."""
    if given:
        return Path(given)
    if data is None:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        data = cfg.get("data")
    try:  # one folder or a mixture (its sources share one token space: any manifest will do)
        folders = [Path(s.path) for s in parse_sources(data)]
    except ConfigError:
        folders = []
    for data in folders:
        manifest = data / "manifest.json"
        if manifest.is_file():
            tok = json.loads(manifest.read_text()).get("tokenizers") or ""
            if tok and Path(tok).is_dir():
                return Path(tok)
    raise UserError(f"cannot find the tokenizer set of {run} (its data manifest names none, or it moved); "
                    f"pass --tokenizers DIR (`anymodal train`: tokenizers=DIR)")


def load_run_model(run: str | Path, step: int | None = None) -> tuple[int, Path, Transformer]:
    """(step, checkpoint, model) of the newest (or the given) complete checkpoint of `run`, with its
    code factors as trained (not folded)."""
    run = Path(run)
    if not (run / "model.yaml").is_file():
        raise UserError(f"{run} is not a training run (no model.yaml)")
    if step is None:
        found = latest_checkpoint(run / CKPT_DIR)
        if found is None:
            raise UserError(f"{run} has no complete checkpoint")
    else:
        found = next(((s, p) for s, p in list_checkpoints(run / CKPT_DIR) if s == step), None)
        if found is None:
            raise UserError(f"{run} has no complete checkpoint of step {step}")
    ckpt_step, ckpt = found
    model = Transformer(load_config(ModelConfig, run / "model.yaml", ["activation_checkpointing=false"]))
    missing, unexpected = model.load_weights(consolidate(ckpt))
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} does not fit {run}/model.yaml: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return ckpt_step, ckpt, model


def export(run: str | Path, out: str | Path, tokenizers: str | Path | None = None, step: int | None = None) -> Path:
    """Write the bundle for the newest (or the given) checkpoint of `run`; returns its folder."""
    run, out = Path(run), Path(out)
    ckpt_step, ckpt, model = load_run_model(run, step)
    space = TokenSpace.load(run)
    tok_dir = tokenizer_dir(run, tokenizers)
    toks = load_tokenizers(tok_dir)
    toks.space.check_same(space, f"{tok_dir} vs the run {run}")

    if not model.cfg.blind_decode:  # a bundle is a plain model (one table row per id) unless it needs the factors
        model = model.fold_code_factors()
    cfg = model.cfg

    tmp = fresh_dir_beside(out, "tmp-export")
    save_config(cfg, tmp / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.weights().items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "step": str(ckpt_step)})
    space.save(tmp / "token_space.json")
    for name in TOKENIZER_KINDS:
        if (tok_dir / name).is_dir():
            shutil.copytree(tok_dir / name, tmp / name, ignore=shutil.ignore_patterns("checkpoints", "*.tmp"))
    if (run / "config.yaml").is_file():
        shutil.copy(run / "config.yaml", tmp / "train_config.yaml")
    (tmp / "export.json").write_text(json.dumps({"run": str(run.resolve()), "step": ckpt_step,
                                                 "checkpoint": ckpt.name, "tokenizers": str(tok_dir.resolve()),
                                                 "params": model.num_params()}, indent=1))
    replace_dir(tmp, out)
    print(f"[export] {run} step {ckpt_step} -> {out} ({model.num_params():,} parameters)", file=sys.stderr)
    return out

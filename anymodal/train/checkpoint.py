"""Training checkpoints of every trainer: one naming, listing, rotation and RNG-state contract over
two layouts.

    CKPT/step_00000100/           the LM: a DeepSpeed checkpoint folder
        (DeepSpeed's files: model states, optimizer states / ZeRO partitions)
        anymodal_rank{r}.json     per rank: RNG states
        meta.json                 step, data-loader position, ... (written last: the folder is complete)
    CKPT/latest                   the LM: name of the newest complete step folder (written last)
    CKPT/step_00000100.pt         the tokenizer trainers: one `torch.save` file, complete once renamed

`list_checkpoints(CKPT)` / `latest_checkpoint(CKPT)` give `(step, path)` of complete checkpoints of
either layout, `prune_checkpoints(CKPT, keep)` deletes all but the newest `keep`.

The LM's save: every rank writes into `tmp.step_N/`; after a barrier rank 0 writes meta.json, renames
the folder to `step_N/`, points `latest` at it and prunes. A crash at any moment leaves the previous
checkpoint or the new one complete and pointed to; half-written `tmp.*` folders are ignored and
removed at the next save. A tokenizer checkpoint is written to `step_N.pt.tmp` and renamed.

Our own state is never pickled objects: RNG states are JSON values (`rng_state`), stored as JSON by
the LM and inside the `.pt` files (read back with `torch.load(weights_only=True)`) by the tokenizers.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_path, write_atomic

CKPT_DIR = "checkpoints"  # the checkpoint folder inside a run / output folder
LATEST = "latest"
_NAME = re.compile(r"step_(\d+)(\.pt)?")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- RNG states as JSON values ---------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy (legacy global), torch and (when in use) this device's CUDA RNG states."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s values; a checkpoint from before they were JSON is refused in one line."""
    if not isinstance(state, dict) or not isinstance(state.get("torch"), str) or "python" not in state:
        raise UserError("this checkpoint keeps its RNG state in the layout of anymodal before 2026-12-03, "
                        "which cannot be resumed; start this training afresh (finished tokenizers still load)")
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype=np.uint8).copy())


# ---- finding and rotating checkpoints ----------------------------------------------------------------
def _complete(path: Path) -> bool:
    """A step file exists only once renamed into place; a step folder is complete with its meta.json."""
    return path.is_file() if path.suffix == ".pt" else (path / "meta.json").is_file()


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `ckpt_dir`, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and _complete(p)]
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint: the `latest` pointer where there is one, or the highest
    complete step when the pointer is missing or stale (a crash between the rename and the pointer)."""
    root = Path(ckpt_dir)
    found = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        m = _NAME.fullmatch(p.name)
        if m and _complete(p) and (not found or int(m.group(1)) >= found[-1][0]):
            return int(m.group(1)), p
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    for _, old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ---- the tokenizer trainers: one file per checkpoint -------------------------------------------------
def save_state(ckpt_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """`torch.save` a dict of tensors and plain values as CKPT/step_N.pt, atomically; keep the newest `keep`."""
    path = Path(ckpt_dir) / f"{step_name(step)}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    prune_checkpoints(ckpt_dir, keep)
    return path


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a pickle traceback
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


# ---- the LM: DeepSpeed checkpoint folders --------------------------------------------------------------
def save_engine_checkpoint(engine, ckpt_dir: str | Path, step: int, rank_state: dict, meta: dict, keep: int,
                           rank: int, barrier) -> Path:
    """Collective: every rank calls it. Returns the final step folder."""
    root = Path(ckpt_dir)
    name = step_name(step)
    tmp_tag = "tmp." + name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("tmp.*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    write_atomic(root / tmp_tag / f"anymodal_rank{rank}.json", json.dumps(rank_state))
    barrier()
    final = root / name
    if rank == 0:
        write_atomic(root / tmp_tag / "meta.json", json.dumps({**meta, "step": step, "time": time.time()}))
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        (root / tmp_tag).replace(final)
        write_atomic(root / LATEST, name)
        prune_checkpoints(root, keep)
    barrier()
    return final


def load_engine_checkpoint(engine, path: Path, rank: int) -> tuple[dict, dict]:
    """Restore model and optimizer into `engine`; returns (meta, this rank's state)."""
    # the lr is a function of the step (anymodal.train.schedule): a scheduler saved by older runs is not needed
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    meta = json.loads((path / "meta.json").read_text())
    own = path / f"anymodal_rank{rank}.json"
    rank_state = json.loads(own.read_text()) if own.is_file() else {}
    return meta, rank_state

"""Training checkpoints: DeepSpeed `save_checkpoint` into step folders, atomically, last K kept.

    RUN/checkpoints/step_00000100/     one complete checkpoint
        (DeepSpeed's files: model states, optimizer states / ZeRO partitions, lr scheduler)
        anymodal_rank{r}.json          per rank: data-loader position and RNG states
        meta.json                      step, world size, ... — written last inside the folder
    RUN/checkpoints/latest             name of the newest complete step folder (written last)

Every rank writes into `tmp.step_N/`; after a barrier rank 0 writes meta.json, renames the folder
to `step_N/`, then points `latest` at it and deletes the oldest folders beyond `keep_last`. A crash
at any moment leaves either the previous checkpoint or the new one complete and pointed to;
half-written `tmp.*` folders are ignored and cleaned up at the next save.

Our own state is JSON (RNG states as base64), never pickle; DeepSpeed's files are its own format.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..fileio import write_atomic

CKPT_DIR = "checkpoints"
LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:08d}"



# ---- RNG states as JSON ----------------------------------------------------------------------------
def rng_state() -> dict:
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
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()))


# ---- finding checkpoints -----------------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    out = []
    for p in root.glob("step_*") if root.is_dir() else []:
        if p.is_dir() and is_complete(p):
            try:
                out.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint: the `latest` pointer, or the highest complete step folder
    when the pointer is missing or stale (a crash between the rename and the pointer)."""
    root = Path(run_dir) / CKPT_DIR
    found = list_checkpoints(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if p.is_dir() and is_complete(p):
            step = int(p.name[5:])
            if not found or step >= found[-1][0]:
                return step, p
    return found[-1] if found else None


# ---- save / load -------------------------------------------------------------------------------------
def save_checkpoint(engine, run_dir: str | Path, step: int, rank_state: dict, meta: dict, keep_last: int,
                    rank: int, barrier) -> Path:
    """Collective: every rank calls it. Returns the final step folder."""
    root = Path(run_dir) / CKPT_DIR
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
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, path: Path, rank: int) -> tuple[dict, dict]:
    """Restore model, optimizer and scheduler into `engine`; returns (meta, this rank's state)."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    meta = json.loads((path / "meta.json").read_text())
    own = path / f"anymodal_rank{rank}.json"
    rank_state = json.loads(own.read_text()) if own.is_file() else {}
    return meta, rank_state

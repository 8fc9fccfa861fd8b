"""Small helpers shared by the tokenizer trainers: atomic saves, RNG state, checkpoint rotation.

Checkpoints are plain dicts of tensors and Python numbers saved with `torch.save` and read back
with `torch.load(weights_only=True)` (never unpickling arbitrary objects). Every write goes to a
temporary file first and is renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch


def atomic_torch_save(obj: dict, path: str | Path) -> None:
    """torch.save to `path.tmp`, then rename (readable with torch.load(weights_only=True))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors save of a state dict (tensors made contiguous, on CPU), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def rng_state() -> dict:
    """Python, numpy (legacy global) and torch RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),  # the Mersenne state words + position
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `ckpt_dir`, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.search(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def keep_last(ckpt_dir: str | Path, k: int) -> None:
    """Delete all but the newest `k` checkpoints (k <= 0 keeps everything)."""
    if k <= 0:
        return
    for _, p in list_checkpoints(ckpt_dir)[:-k]:
        p.unlink(missing_ok=True)


class BudgetBar:
    """A tqdm bar over steps, or over the time budget when one is set.

    With `max_minutes` the wall clock ends training (the step count is only a cap), so the bar
    counts seconds of the budget and shows the step in its postfix: no "27:41:04" ETAs computed
    from a step cap the run will never reach.
    """

    def __init__(self, steps: int, max_minutes: float, step: int, elapsed: float, desc: str,
                 disable: bool = False):
        import sys

        from tqdm import tqdm

        self.budget = float(max_minutes) * 60.0
        self.extra: dict = {}  # postfix fields that stay until replaced (e.g. the last val PSNR)
        if self.budget > 0:
            self.bar = tqdm(total=round(self.budget), initial=min(round(elapsed), round(self.budget)), desc=desc,
                            unit="s", disable=disable, dynamic_ncols=True, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=disable, dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, step: int, elapsed: float, **postfix) -> None:
        if self.budget > 0:
            self.bar.update(max(0, min(round(elapsed), round(self.budget)) - self.bar.n))
            postfix = {"step": step, **postfix}
        else:
            self.bar.update(max(0, step - self.bar.n))
        self.bar.set_postfix(ordered_dict={**postfix, **self.extra}, refresh=False)

    def set_postfix(self, **fields) -> None:
        self.extra.update(fields)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()

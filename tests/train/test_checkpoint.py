"""One checkpoint contract for every trainer: listing, the newest complete one, rotation, RNG states."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from anymodal.errors import UserError
from anymodal.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    rng_state,
    save_state,
    set_rng_state,
)


def test_latest_complete_step_folder(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "meta.json").write_text(json.dumps({"step": step}))
    (root / "step_00000006").mkdir()  # renamed without meta.json cannot happen; a partial copy can
    (root / "tmp.step_00000008").mkdir()  # a save that was interrupted
    (root / "latest").write_text("step_00000002")  # stale pointer (crash before it was updated)
    step, path = latest_checkpoint(root)
    assert step == 4 and path.name == "step_00000004"
    (root / "latest").write_text("step_00000004")
    assert latest_checkpoint(root)[0] == 4
    assert [s for s, _ in list_checkpoints(root)] == [2, 4]
    assert latest_checkpoint(tmp_path / "nothing") is None and list_checkpoints(tmp_path / "nothing") == []
    prune_checkpoints(root, 1)
    assert [p.name for _, p in list_checkpoints(root)] == ["step_00000004"]


def test_state_files_rotate_and_round_trip(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        path = save_state(root, step, {"step": step, "w": torch.arange(3), "rng": rng_state()}, keep=2)
    assert path.name == "step_00000009.pt"
    (root / "step_00000012.pt.tmp").write_bytes(b"half")  # a write that never got renamed
    assert [s for s, _ in list_checkpoints(root)] == [6, 9]
    assert latest_checkpoint(root) == (9, path)
    state = load_state(path)  # weights_only: tensors and plain values
    assert state["step"] == 9 and state["w"].tolist() == [0, 1, 2]
    save_state(root, 12, {}, keep=0)  # keep <= 0 keeps everything
    assert [s for s, _ in list_checkpoints(root)] == [6, 9, 12]


def test_rng_state_round_trips_as_json():
    state = json.loads(json.dumps(rng_state()))  # the LM stores it as JSON, the tokenizers in .pt files
    want = (random.random(), np.random.rand(), torch.rand(2).tolist())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == want


def test_an_rng_state_of_the_old_tensor_layout_is_refused_in_one_line():
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    with pytest.raises(UserError, match="before 2026-12-03"):
        set_rng_state(old)

"""DeepSpeed with two CPU processes (ZeRO-2, gloo): train, checkpoint, resume; same losses and the same
realized data mix as one process (the data: a two-folder mixture).

Launched exactly as a user would: `deepspeed --no_local_rank --num_accelerators 2 --module anymodal.cli
train ...`. Two ranks with micro-batch 1 see, step by step, the rows one process sees with micro-batch 1
and grad_accum 2 (see anymodal.data.packing), so the losses agree up to float summation order: the
two-process gradient is an all-reduced average, the one-process one an accumulated sum, which differ
in the last bits and drift apart a little over steps (measured: equal for 5 steps, 4e-8 relative at
step 6). Tolerance: 1e-5 relative.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from anymodal.train.checkpoint import list_checkpoints
from anymodal.train.lm import load_train_config, train
from anymodal.train.metrics import read_metrics


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, env) -> str:
    # the launcher's module rather than its script: a --target install has no bin/deepspeed
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port",
           str(_port()), "--no_local_rank", "--module", "anymodal.cli", "train", "--config", "train/demo", *args]
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    return r.stdout


def test_two_processes_zero2_resume_and_match_one_process(tiny_args, mix_args, cli_env, tmp_path):
    common = [*tiny_args, *mix_args, "zero_stage=2", "micro_batch=1", "schedule=constant", "checkpoint_every=2"]
    run = tmp_path / "two"
    _launch([*common, f"run_dir={run}", "steps=4"], cli_env)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]
    ckpt = list_checkpoints(run / "checkpoints")[-1][1]
    # ZeRO-2 on two ranks: each rank saved its own optimizer partition
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    assert {p.name for p in ckpt.glob("anymodal_rank*.json")} == {"anymodal_rank0.json", "anymodal_rank1.json"}
    out = _launch([*common, f"run_dir={run}", "steps=6", "--resume"], cli_env)
    assert "resumed from" in out
    two = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(two) == list(range(1, 7))

    one = train(load_train_config("train/demo", [*common, "grad_accum=2", f"run_dir={tmp_path / 'one'}", "steps=6"]))
    for s in range(1, 7):
        assert two[s] == pytest.approx(one.losses[s], rel=1e-5), (s, two[s], one.losses[s])
    assert one.losses[6] < one.losses[1]
    # tokens per source / kind / modality: global counts, the same for two processes (resumed) and one
    realized = [json.loads((r / "data_mix.json").read_text())["realized"] for r in (run, tmp_path / "one")]
    assert realized[0] == realized[1] and realized[0]["tokens"] > 0

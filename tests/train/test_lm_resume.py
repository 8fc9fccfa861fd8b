"""Kill-and-resume: a run stopped by SIGTERM and resumed gives exactly the losses (and realized data
mix) of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from anymodal.train.checkpoint import latest_checkpoint
from anymodal.train.lm import load_train_config, train
from anymodal.train.metrics import read_metrics


def test_sigterm_then_resume_is_exact(tiny_args, mix_args, cli_env, tmp_path):
    run = tmp_path / "killed"
    # constant lr after warmup: the total step count does not shape the schedule, so the killed
    # run (asked for many steps) and the reference (asked for exactly k + 4) follow the same curve.
    # The data: a mixture of two folders (weights 3:1, kind weights), whose epochs repeat documents.
    common = [*tiny_args, *mix_args, "schedule=constant", "checkpoint_every=1000"]
    cmd = [sys.executable, "-m", "anymodal.cli", "train", "--config", "train/demo", *common,
           f"run_dir={run}", "steps=100000"]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while len(read_metrics(run / "metrics.jsonl")) < 4:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training subprocess made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out  # stopped by SIGTERM, after saving
    assert "SIGTERM" in out and "--resume" in out
    k, ckpt = latest_checkpoint(run / "checkpoints")
    assert k >= 4 and read_metrics(run / "metrics.jsonl")[-1]["step"] == k
    assert json.loads((ckpt / "meta.json").read_text())["loader"]["consumed"] == 4 * k

    n = k + 4
    resumed = train(load_train_config("train/demo", [*common, f"run_dir={run}", f"steps={n}"]), resume=True)
    reference = train(load_train_config("train/demo", [*common, f"run_dir={tmp_path / 'ref'}", f"steps={n}"]))
    assert sorted(resumed.losses) == list(range(k + 1, n + 1))
    for s in range(k + 1, n + 1):
        assert resumed.losses[s] == reference.losses[s], (s, resumed.losses[s], reference.losses[s])
    for a, b in zip(resumed.model.parameters(), reference.model.parameters()):
        assert a.equal(b)
    # the metrics file reads as one run: steps 1..n once each, the killed part equal to the reference
    killed = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    ref = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in killed] == list(range(1, n + 1))
    assert [r["loss"] for r in killed] == [r["loss"] for r in ref]
    # the realized mix continued from the checkpoint's counts: the same as the uninterrupted run's
    mixes = [r for r in read_metrics(run / "metrics.jsonl") if "mix" in r]
    assert [r["step"] for r in mixes] == [k, n]  # where SIGTERM stopped it, and the last step
    done = json.loads((run / "data_mix.json").read_text())
    assert done["step"] == n and done["realized"] == json.loads((tmp_path / "ref" / "data_mix.json").read_text())["realized"]
    assert mixes[-1]["mix"]["source"] == done["realized"]["source"]


def test_resume_without_checkpoint_starts_fresh_and_model_change_is_refused(tiny_args):
    import pytest

    from anymodal.errors import UserError

    # (with activation checkpointing: recomputed blocks train the same way)
    res = train(load_train_config("train/demo", [*tiny_args, "steps=2", "activation_checkpointing=true"]),
                resume=True)
    assert res.model.cfg.activation_checkpointing
    assert res.step == 2 and sorted(res.losses) == [1, 2]
    with pytest.raises(UserError, match="model config changed"):
        train(load_train_config("train/demo", [*tiny_args, "steps=4", "model.n_layers=3"]), resume=True)


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tiny_args):
    import pytest

    from anymodal.errors import UserError

    train(load_train_config("train/demo", [*tiny_args, "steps=1"]))
    with pytest.raises(UserError, match="--resume"):
        train(load_train_config("train/demo", [*tiny_args, "steps=2"]))

"""Which accelerator `anymodal train` uses: the `device` key, the machine and DS_ACCELERATOR."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anymodal.errors import ConfigError, UserError
from anymodal.train.lm import load_train_config, use_cuda


@pytest.mark.parametrize("gpu, accel, device, want", [
    (False, "", "auto", False),
    (True, "", "auto", True),
    (True, "cpu", "auto", False),  # the test suite's setting: DeepSpeed's CPU accelerator
    (True, "cuda", "auto", True),
    (True, "", "cpu", False),
    (True, "cuda", "cuda", True),
])
def test_device_choice(monkeypatch, gpu, accel, device, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("DS_ACCELERATOR", accel)
    assert use_cuda(device) is want


@pytest.mark.parametrize("gpu, accel, device, message", [
    (False, "", "cuda", "no CUDA device"),
    (True, "cpu", "cuda", "DS_ACCELERATOR=cpu"),
    (True, "cuda", "cpu", "DS_ACCELERATOR=cuda"),
])
def test_contradictory_device_settings_are_one_line_errors(monkeypatch, gpu, accel, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("DS_ACCELERATOR", accel)
    with pytest.raises(UserError, match=message):
        use_cuda(device)


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="device"):
        load_train_config("train/demo", ["device=gpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_runs_bf16_and_the_loss_falls(tiny_args, cli_env):
    env = {**cli_env}
    env.pop("DS_ACCELERATOR")  # DeepSpeed's CUDA accelerator, in a fresh process
    run = next(a for a in tiny_args if a.startswith("run_dir=")).split("=", 1)[1]
    r = subprocess.run([sys.executable, "-m", "anymodal.cli", "train", "--config", "train/demo", *tiny_args,
                        "device=cuda", "steps=30"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = json.loads((Path(run) / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True
    recs = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs if "tokens_per_s" in x]
    assert len(losses) >= 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3

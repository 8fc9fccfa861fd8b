"""LM training: the loss falls, metrics and plots are written, NaN steps are skipped, configs checked."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import anymodal.train.lm as lm
from anymodal.errors import ConfigError, UserError
from anymodal.modality import MODALITY_NAMES
from anymodal.train.lm import (
    DivergedError,
    LMTrainer,
    build_model_config,
    distributed,
    load_train_config,
    train,
)
from anymodal.train.metrics import read_metrics


def test_loss_falls_with_per_modality_metrics(tiny_args, tiny_tokens):
    cfg = load_train_config("train/demo", [*tiny_args, "steps=60", "checkpoint_every=30", "keep_last=1",
                                           f"val_data={tiny_tokens}", "eval_every=30", "eval_batches=4"])
    res = train(cfg)
    assert res.step == 60 and res.interrupted is None and res.skipped_steps == 0
    all_recs = read_metrics(res.run_dir / "metrics.jsonl")
    val = [r for r in all_recs if "val_loss" in r]
    assert [r["step"] for r in val] == [30, 60] and val[1]["val_loss"] < val[0]["val_loss"]
    assert all(f"val_loss_{m}" in val[1] for m in ("text", "image", "audio"))
    recs = [r for r in all_recs if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 61))
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert first > 5.0 and last < first - 2.0, (first, last)  # starts near ln(V), learns the world
    for m in ("text", "image", "audio", "loc"):  # every modality is trained and reported
        seen = [r[f"loss_{m}"] for r in recs if f"loss_{m}" in r]
        assert len(seen) > 20 and sum(seen[-5:]) < sum(seen[:5]) - 5.0, m
    r = recs[-1]
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 and r["z_loss"] > 0
    # warmup then cosine to lr · min_lr_ratio
    lrs = [x["lr"] for x in recs]
    assert lrs[0] == pytest.approx(3e-3 / 5) and lrs[4] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 54 / 55))))
    run = res.run_dir
    for name in ("config.yaml", "model.yaml", "token_space.json", "ds_config.json", "loss.png", "loss_image.png"):
        assert (run / name).is_file(), name
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000060"]  # keep_last=1
    assert (run / "checkpoints" / "latest").read_text() == "step_00000060"


def test_nan_loss_skips_the_step(tiny_args, monkeypatch):
    real = lm.lm_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # micro-batches of steps 3 and 4
            out.ce = out.ce * float("nan")
        return out

    monkeypatch.setattr(lm, "lm_loss", flaky)
    cfg = load_train_config("train/demo", [*tiny_args, "steps=6", "checkpoint_every=100"])
    res = train(cfg)
    recs = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]  # not the mix record
    assert [r["skipped"] for r in recs] == [False, False, True, True, False, False]
    assert recs[-1]["skipped_total"] == 2 and res.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in res.model.parameters())  # the NaN never reached the weights
    # skipped steps do not advance the schedule: step 5 uses the lr step 3 would have used
    assert recs[4]["lr"] == pytest.approx(recs[2]["lr"])
    assert math.isfinite(recs[-1]["loss"])


def test_repeated_nan_stops_the_run(tiny_args, monkeypatch):
    real = lm.lm_loss

    def broken(*a, **k):
        out = real(*a, **k)
        out.ce = out.ce * float("inf")
        return out

    monkeypatch.setattr(lm, "lm_loss", broken)
    cfg = load_train_config("train/demo", [*tiny_args, "steps=20", "max_nan_skips=2"])
    with pytest.raises(DivergedError, match="3 steps in a row"):
        train(cfg)


def test_config_checks(tiny_args, tmp_path):
    with pytest.raises(ConfigError, match="zero_stage"):
        load_train_config("train/demo", ["zero_stage=4"])
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        load_train_config("train/demo", ["model.widht=3"])
    with pytest.raises(ConfigError, match="precision"):
        load_train_config("train/demo", ["precision=fp8"])
    cfg = load_train_config("train/1b_gpu")
    assert cfg.zero_stage == 2 and cfg.precision == "bf16" and cfg.model_preset == "model/1b"
    with pytest.raises(UserError, match="anymodal prepare"):
        train(load_train_config("train/demo", [*tiny_args, f"data={tmp_path}"]))


def test_train_step_returns_named_stats_and_the_loss_falls(tiny_args):
    cfg = load_train_config("train/demo", [*tiny_args, "steps=12", "grad_accum=2"])
    with distributed() as deepspeed:
        trainer = LMTrainer(cfg, deepspeed)
        stats = [trainer.train_step(trainer.next_batch()) for _ in range(12)]
    assert [s.step for s in stats] == list(range(1, 13)) and trainer.step == 12
    for s in stats:
        assert all(math.isfinite(v) for v in (s.loss, s.z_loss, s.grad_norm, s.lr, s.seconds, s.mfu))
        assert not s.skipped and not s.stop and s.tokens == 2 * 4 * 64
        assert set(s.modality_tokens) == set(MODALITY_NAMES) and set(s.modality_loss) <= set(MODALITY_NAMES)
        # the modalities make up the whole: their token-weighted mean is the step's loss, up to the
        # loss being a mean of the two micro-batches' means
        labels = sum(s.modality_tokens.values())
        mean = sum(s.modality_loss[m] * s.modality_tokens[m] for m in s.modality_loss) / labels
        assert mean == pytest.approx(s.loss, rel=0.02)
    assert [s.lr for s in stats[:5]] == pytest.approx([3e-3 * (i + 1) / 5 for i in range(5)])  # warmup
    assert stats[-1].tokens_seen == 12 * stats[0].tokens
    assert sum(s.loss for s in stats[-3:]) < sum(s.loss for s in stats[:3]) - 1.5
    rec = stats[-1].record()
    assert list(rec)[:12] == ["step", "loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time",
                              "tokens_seen", "epoch", "skipped", "skipped_total"]
    assert {k[5:] for k in list(rec)[12:]} == set(stats[-1].modality_loss)


def test_deepspeed_config_from_templates():
    from anymodal.train.lm import deepspeed_config

    for stage in range(4):
        cfg = load_train_config("train/demo", [f"zero_stage={stage}", "micro_batch=3", "grad_accum=2"])
        ds = deepspeed_config(cfg, world=4, bf16=stage == 3)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 2
        assert ds["bf16"]["enabled"] == (stage == 3)
        assert ds["gradient_clipping"] == (0.0 if stage == 0 else 1.0)  # stage 0 clips in our optimizer
        json.dumps(ds)


def test_max_minutes_cuts_the_run_and_still_anneals(tiny_args):
    cfg = load_train_config("train/demo", [*tiny_args, "steps=100000", "max_minutes=0.15", "checkpoint_every=1000",
                                           "warmup=5", "min_lr_ratio=0.1"])
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    recs = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    total = res.step
    assert 10 < total < 100000 and res.interrupted is None
    # the whole call (set-up, steps, final save and plots) ends when its 9 s are up, not before
    assert 0.85 * 9.0 < wall < 9.0 + 1.5, wall
    # the decay was re-aimed at the cut: the last update ran at (nearly) the floor lr
    assert recs[-1]["lr"] == pytest.approx(3e-3 * 0.1, rel=0.25)
    # the budget is in the checkpoint: resuming does not train past it
    again = train(load_train_config("train/demo", [*tiny_args, "steps=100000", "max_minutes=0.15"]), resume=True)
    assert again.step == total


@pytest.mark.parametrize("override, want", [([], True), (["activation_checkpointing=false"], False),
                                            (["model_preset=model/demo", "activation_checkpointing=true"], True),
                                            (["model_preset=model/demo"], False)])
def test_activation_checkpointing_follows_the_preset_unless_the_run_sets_it(override, want):
    cfg = load_train_config("train/1b_gpu", ["activation_checkpointing=null", *override])
    assert build_model_config(cfg, 4608).activation_checkpointing is want

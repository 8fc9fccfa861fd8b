"""Dashboards: every metrics.jsonl record also reaches DeepSpeed's monitor (`monitor=csv|tensorboard|wandb`
or a `deepspeed=` template's own monitor section), value for value and step for step."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from anymodal.errors import ConfigError, UserError
from anymodal.train.lm import deepspeed_config, load_train_config, train
from anymodal.train.metrics import MetricsLog, monitor_events, read_metrics


def read_monitor_csv(folder: Path, name: str) -> list[tuple[int, float]]:
    """What DeepSpeed's csvMonitor wrote for event `name`: one file per event name,
    `output_path/job_name/<name with "/" and " " as "_">.csv`, a `step,<last part of name>` header
    (again after each restart of the writer) and one `step,value` row per event."""
    path = folder / (name.replace("/", "_").replace(" ", "_") + ".csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", name.split("/")[-1]], rows[0]
    return [(int(s), float(v)) for s, v in rows if s != "step"]


def test_csv_monitor_holds_the_metrics_step_for_step(tiny_args, tiny_tokens):
    cfg = load_train_config("train/demo", [*tiny_args, "steps=6", "checkpoint_every=100", "monitor=csv",
                                           f"val_data={tiny_tokens}", "eval_every=3", "eval_batches=2"])
    res = train(cfg)
    run = res.run_dir
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["csv_monitor"] == {"enabled": True, "output_path": str(run / "monitor"), "job_name": "run"}
    folder = run / "monitor" / "run"
    recs = read_metrics(run / "metrics.jsonl")
    for key in ("loss", "lr", "grad_norm", "z_loss", "loss_text", "loss_image", "tokens_per_s", "mfu",
                "val_loss", "val_loss_audio"):
        want = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        assert len(want) >= (2 if key.startswith("val_") else 3), key
        assert read_monitor_csv(folder, f"Train/{key}") == want, key  # exact: the CSV holds repr(float)
    assert [s for s, _ in read_monitor_csv(folder, "Train/val_loss")] == [3, 6]
    assert read_monitor_csv(folder, "Train/skipped") == [(s, 0.0) for s in range(1, 7)]  # a bool as 0/1
    # nested records flattened with "/": the realized data mix (cumulative label tokens per modality)
    mix = [(r["step"], r["mix"]["modality"]["text"]) for r in recs if "mix" in r]
    assert read_monitor_csv(folder, "Train/mix/modality/text") == mix and len(mix) == 2
    # DeepSpeed's own events stay beside ours (x = samples seen)
    assert (folder / "Train_Samples_lr.csv").is_file()



def test_tensorboard_monitor_holds_the_metrics(tiny_args):
    """With the tensorboard extra installed: the same records as TensorBoard scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(load_train_config("train/demo", [*tiny_args, "steps=3", "checkpoint_every=100",
                                                 "monitor=tensorboard"]))
    events = EventAccumulator(str(res.run_dir / "monitor" / "run")).Reload()
    recs = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "loss_text"):
        got = [(e.step, e.value) for e in events.Scalars(f"Train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in recs], key  # stored as float32

def test_template_monitor_section_receives_the_records(tiny_args, tmp_path):
    """A user's DeepSpeed JSON with its own monitor section (monitor= unset) gets the records too."""
    out = tmp_path / "dash"
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                    "csv_monitor": {"enabled": True, "output_path": str(out), "job_name": "mine"}}))
    res = train(load_train_config("train/demo", [*tiny_args, "steps=2", "checkpoint_every=100",
                                                 f"deepspeed={template}"]))
    recs = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    assert read_monitor_csv(out / "mine", "Train/loss") == [(r["step"], r["loss"]) for r in recs]
    assert not (res.run_dir / "monitor").exists()


def _installed(monkeypatch, name: str) -> None:
    """Make `name` look installed (wandb is not, in the test environment)."""
    import importlib.machinery
    import types

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, module)


def test_monitor_config_sections(tmp_path, monkeypatch):
    _installed(monkeypatch, "wandb")
    run = tmp_path / "r1"
    base = [f"run_dir={run}"]
    ds = deepspeed_config(load_train_config("train/demo", [*base]), 1, False)
    assert not {"csv_monitor", "tensorboard", "wandb"} & set(ds)  # off by default
    ds = deepspeed_config(load_train_config("train/demo", [*base, "monitor=csv", f"monitor_dir={tmp_path / 'm'}"]),
                          1, False)
    assert ds["csv_monitor"] == {"enabled": True, "output_path": str(tmp_path / "m"), "job_name": "r1"}
    ds = deepspeed_config(load_train_config("train/demo", [*base, "monitor=wandb"]), 1, False)
    assert ds["wandb"] == {"enabled": True, "project": "anymodal"}  # DeepSpeed's wandb section has no paths
    # the key turns on the template's section: its other keys (job name, wandb team) stay
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"csv_monitor": {"enabled": False, "job_name": "named"},
                                    "wandb": {"team": "t", "project": "p"}}))
    cfg = load_train_config("train/demo", [*base, "monitor=csv", f"deepspeed={template}"])
    assert deepspeed_config(cfg, 1, False)["csv_monitor"] == {"enabled": True, "job_name": "named",
                                                              "output_path": str(run / "monitor")}
    cfg = load_train_config("train/demo", [*base, "monitor=wandb", f"deepspeed={template}"])
    assert deepspeed_config(cfg, 1, False)["wandb"] == {"enabled": True, "team": "t", "project": "p"}


def test_bad_monitor_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="config key 'monitor' is 'tb'; valid choices: tensorboard, csv, wandb") as e:
        load_train_config("train/demo", ["monitor=tb"])
    assert "\n" not in str(e.value)


def test_tensorboard_monitor_without_tensorboard_says_what_to_install(tiny_args, tmp_path, monkeypatch, capsys):
    from anymodal.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(UserError, match="^monitor=tensorboard needs the tensorboard package: pip install tensorboard$"):
        deepspeed_config(load_train_config("train/demo", [f"run_dir={tmp_path}", "monitor=tensorboard"]), 1, False)
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"tensorboard": {"enabled": True}}))
    with pytest.raises(UserError, match="DeepSpeed config's tensorboard monitor needs the tensorboard package"):
        deepspeed_config(load_train_config("train/demo", [f"run_dir={tmp_path}", f"deepspeed={template}"]), 1, False)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="^monitor=wandb needs the wandb package: pip install wandb$"):
        deepspeed_config(load_train_config("train/demo", [f"run_dir={tmp_path}", "monitor=wandb"]), 1, False)
    # through the CLI: one line, exit code 2, before any model is built
    assert main(["train", "--config", "train/demo", *tiny_args, "monitor=tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "anymodal: error: monitor=tensorboard needs the tensorboard package: pip install tensorboard"
    assert not any("Traceback" in line for line in err)


def test_monitor_events_flatten_numbers_only(tmp_path):
    rec = {"step": 7, "loss": 2.5, "grad_norm": None, "skipped": True, "epoch": 0, "note": "x", "xs": [1, 2],
           "tasks": {"t2i_accuracy": 0.5, "asr_wer": None, "by": {"n": 3}}}
    assert monitor_events(rec) == [("Train/loss", 2.5, 7), ("Train/skipped", 1, 7), ("Train/epoch", 0, 7),
                                   ("Train/tasks/t2i_accuracy", 0.5, 7), ("Train/tasks/by/n", 3, 7)]
    assert monitor_events({"loss": 1.0}) == []  # no step, no events
    got = []
    log = MetricsLog(tmp_path / "m.jsonl", sink=got.extend)
    log.write({"step": 1, "loss": float("nan")})
    log.close()
    assert got[0][0] == "Train/loss" and got[0][1] != got[0][1]  # NaN goes to the dashboard as NaN
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1, "loss": "nan"}]
    got.clear()
    MetricsLog(tmp_path / "n.jsonl", enabled=False, sink=got.extend).write({"step": 1, "loss": 1.0})
    assert got == []  # ranks other than 0 write nothing anywhere

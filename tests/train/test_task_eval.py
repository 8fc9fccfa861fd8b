"""Task metrics during training: records in metrics.jsonl, a curve, and the same numbers as `eval`."""

from __future__ import annotations

import json

import pytest

from anymodal.cli import main
from anymodal.data.world import generate_world
from anymodal.errors import ConfigError
from anymodal.train.lm import load_train_config, train
from anymodal.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def val_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, "val", docs=40, seed=1, progress=False)
    return str(out / "val-*.tar")


def test_task_metrics_every_n_steps_match_eval_of_the_export(tiny_args, val_world, tmp_path):
    cfg = load_train_config("train/demo", [*tiny_args, "steps=6", "task_eval_every=4", f"task_eval_data={val_world}",
                                           "task_eval_limit=2", "task_eval_tasks=[t2i,i2t,ground,refer,asr]"])
    res = train(cfg)
    recs = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "tasks" in r]
    assert [r["step"] for r in recs] == [0, 4, 6]  # the untrained start, every 4 steps, the last step
    # minutes are kept to 3 decimals: two steps a fast machine makes within 0.06 s may share a value
    assert recs[0]["minutes"] == 0.0 < recs[1]["minutes"] <= recs[2]["minutes"]
    for r in recs:
        t = r["tasks"]
        assert set(t["n"]) == {"t2i", "i2t", "ground", "refer", "asr"} and all(0 < n <= 2 for n in t["n"].values())
        assert all(0.0 <= t[k] <= 1.0 for k in ("t2i_accuracy", "caption_accuracy", "grounding_acc50",
                                                 "grounding_miou", "refer_accuracy"))
        assert t["asr_wer"] >= 0.0 and "a2i_accuracy" not in t
    assert (res.run_dir / "tasks.png").is_file()
    # the last record is what `anymodal eval` measures on the exported model, document for document
    bundle, out = tmp_path / "bundle", tmp_path / "metrics.json"
    assert main(["export", "--run", str(res.run_dir), "--out", str(bundle)]) == 0
    assert main(["eval", "--model", str(bundle), "--data", val_world, "--out", str(out), "--limit", "2"]) == 0
    full = json.loads(out.read_text())
    for key in ("t2i_accuracy", "caption_accuracy", "grounding_miou", "refer_accuracy", "asr_wer"):
        assert recs[-1]["tasks"][key] == pytest.approx(full[key], abs=1e-9), key


def test_task_eval_config_checks(tiny_args):
    with pytest.raises(ConfigError, match="task_eval_data"):
        load_train_config("train/demo", [*tiny_args, "task_eval_every=5"])
    with pytest.raises(Exception, match="unknown task 'draw'"):
        load_train_config("train/demo", [*tiny_args, "task_eval_every=5", "task_eval_data=x",
                                         "task_eval_tasks=[t2i,draw]"])

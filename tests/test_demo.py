"""`anymodal demo`: the default recipe's stages and the commands they run (the CLI calls recorded,
not run), resuming at the first unfinished stage, and the report."""

import json

import pytest
import yaml

from anymodal.config import load_config
from anymodal.demo import Demo, DemoConfig, write_report
from anymodal.errors import UserError


class RecordingDemo(Demo):
    """Records each `anymodal …` command instead of running it; the showcase and the tokenizer
    set are skipped (they need trained tokenizers)."""

    def __init__(self, cfg, out):
        super().__init__(cfg, out)
        self.cuda = False
        self.calls: list[list[str]] = []

    def anymodal(self, *args: str) -> None:
        self.calls.append(list(args))
        if args[0] == "eval":
            out = args[args.index("--out") + 1]
            with open(out, "w") as f:
                json.dump({"t2i_accuracy": 0.5, "unseen": {}, "bits_per_token": {"image": 3.0}}, f)

    def showcase(self, bundle_dir, world) -> None:
        (self.out / "showcase").mkdir(parents=True, exist_ok=True)


def _run(tmp_path, monkeypatch, overrides=()):
    monkeypatch.setattr("anymodal.demo._assemble", lambda toks: None)
    demo = RecordingDemo(load_config(DemoConfig, "demo", list(overrides)), tmp_path)
    demo.run()
    return demo


def _arg(call: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in call if a.startswith(key + "="))


def test_default_recipe_runs_every_stage_with_its_settings(tmp_path, monkeypatch):
    calls = _run(tmp_path, monkeypatch).calls
    assert [c[0] for c in calls] == ["world", "world", "world", "world", "tokenizer", "tokenizer", "tokenizer",
                                     "prepare", "prepare", "prepare", "prepare", "train", "export", "eval"]
    train_world, val_world, one_object, many_objects = calls[:4]
    assert train_world[train_world.index("--docs") + 1] == "30000"
    assert val_world[val_world.index("--docs") + 1] == "900"
    # val has every kind equally, so eval finds its 100 documents per kind; train keeps the config's mix
    assert _arg(val_world, "kinds.t2i") == "1" and _arg(val_world, "kinds.asr") == "1"
    assert not any(a.startswith("kinds.") for a in train_world)
    # the extra sources: their own documents (no speech), prepared apart, 30% of the training tokens each
    assert "--no-audio" in one_object and _arg(one_object, "max_objects") == "1"
    assert "--no-audio" in many_objects and _arg(many_objects, "min_objects") == "2"
    assert _arg(many_objects, "max_queries") == "1"  # no answer there by elimination
    assert one_object[one_object.index("--out") + 1] == str(tmp_path / "world" / "one_object")
    assert [c[c.index("--out") + 1] for c in calls[9:11]] == [str(tmp_path / "tokens" / n)
                                                              for n in ("one_object", "many_objects")]
    train = calls[11]
    sources = yaml.safe_load(_arg(train, "data"))
    assert [(x["name"], x["weight"]) for x in sources] == [("world", 0.4), ("one_object", 0.3), ("many_objects", 0.3)]
    assert sources[1]["path"] == str(tmp_path / "tokens" / "one_object")
    assert _arg(train, "model_preset") == "model/demo_1m" and _arg(train, "task_eval_every") == "200"
    assert _arg(train, "task_eval_data") == str(tmp_path / "world" / "val-*.tar")
    ev = calls[13]
    assert ev[ev.index("--limit") + 1] == "100"
    assert ev[ev.index("--examples") + 1] == str(tmp_path / "eval_examples.jsonl")
    assert (tmp_path / "report.html").is_file()


def test_finished_stages_are_skipped_and_overrides_reach_their_stage(tmp_path, monkeypatch):
    _run(tmp_path, monkeypatch)
    for stage in ("train", "export", "eval", "showcase"):
        (tmp_path / ".done" / stage).unlink()
    demo = _run(tmp_path, monkeypatch, ["train_overrides=[max_minutes=1]", "world.overrides=[image_size=40]"])
    assert [c[0] for c in demo.calls] == ["train", "export", "eval"]
    assert _arg(demo.calls[0], "max_minutes") == "1"
    demo = _run(tmp_path / "fresh", monkeypatch, ["world.overrides=[image_size=40]", "text_tokenizer_overrides=[loc_bins=16]",
                                                  "world.extra_sources=[]"])
    assert _arg(demo.calls[0], "image_size") == "40" and _arg(demo.calls[1], "image_size") == "40"
    assert _arg(demo.calls[2], "loc_bins") == "16"
    assert _arg(next(c for c in demo.calls if c[0] == "train"), "data") == str(tmp_path / "fresh" / "tokens" / "train")


def test_extra_sources_are_checked(tmp_path, monkeypatch):
    for bad in ("world.extra_sources=[{name: a, docs: 10, weight: 1.0}]",
                "world.extra_sources=[{name: world, docs: 10, weight: 0.2}]",
                "world.extra_sources=[{name: a, docs: 10, weight: 0.2, colour: red}]"):
        with pytest.raises(UserError):
            _run(tmp_path, monkeypatch, [bad])


def test_report_lists_goals_and_the_learning_curve(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tasks.png").write_bytes(b"\x89PNG")
    (tmp_path / "metrics.json").write_text(json.dumps({"t2i_accuracy": 0.25, "unseen": {"t2i_accuracy": 0.0}}))
    html = write_report(tmp_path, DemoConfig()).read_text()
    assert "run/tasks.png" in html and "0.250" in html and "≥ 0.50" in html

"""Training on a data mixture: the planned table is printed, data_mix.json and the metrics mix records
hold exactly the tokens the trained rows held, the counts live in the checkpoint, and a changed
mixture or a bad kind weight is refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anymodal.data.mixture import Mixture, parse_phases, parse_sources
from anymodal.data.packing import PackedLoader
from anymodal.errors import UserError
from anymodal.train.lm import load_train_config, train
from anymodal.train.metrics import read_metrics

MODALITIES = ("text", "image", "audio", "loc")


def _expected(cfg, steps: int) -> list[dict]:
    """Cumulative per-source / per-kind tokens and per-modality labels after each step, computed
    independently from a fresh loader's batches (one process, so a step is grad_accum batches)."""
    mix = Mixture(parse_sources(cfg.data), cfg.kind_weights, parse_phases(cfg.phases))
    loader = PackedLoader(mix, cfg.seq_len, cfg.micro_batch, grad_accum=cfg.grad_accum, seed=cfg.seed,
                          cond_dropout=cfg.cond_dropout, lookahead=cfg.lookahead)
    src = np.zeros(len(mix.sources), np.int64)
    kind = np.zeros(len(mix.kind_names), np.int64)
    labels = dict.fromkeys(MODALITIES, 0)
    out = []
    for _ in range(steps):
        for _ in range(cfg.grad_accum):
            batch = next(loader)
            plan = loader.plan(batch["epoch"])
            for r in batch["rows"]:
                lo, hi = plan.row_ptr[r], plan.row_ptr[r + 1]
                np.add.at(src, mix.source[plan.doc[lo:hi]], plan.length[lo:hi])
                np.add.at(kind, mix.kinds[plan.doc[lo:hi]], plan.length[lo:hi])
            keep = batch["labels"] != -100
            for i, m in enumerate(MODALITIES):
                labels[m] += int((keep & (batch["modality"] == i)).sum())
        out.append({"source": {s.name: int(c) for s, c in zip(mix.sources, src)},
                    "kind": {k: int(c) for k, c in zip(mix.kind_names, kind)}, "modality": dict(labels)})
    return out


def test_mixture_run_writes_the_realized_mix(tiny_args, mix_args, tiny_tokens, tiny_tokens_b, capsys):
    cfg = load_train_config("train/demo", [*tiny_args, *mix_args, "steps=4", "checkpoint_every=2",
                                           f"val_data={tiny_tokens}", "eval_every=3", "eval_batches=1"])
    res = train(cfg)
    err = capsys.readouterr().err
    assert "data mix, planned per epoch" in err and "world" in err and tiny_tokens_b.name in err
    want = _expected(cfg, 4)
    recs = read_metrics(res.run_dir / "metrics.jsonl")
    # per-step records as before; a mix record at the val pass (step 3) and at the last step
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    mixes = [r for r in recs if "mix" in r]
    assert [r["step"] for r in mixes] == [3, 4]
    assert mixes[0]["mix"] == want[2] and mixes[1]["mix"] == want[3]
    got = mixes[1]["mix"]
    tokens = sum(got["source"].values())
    assert tokens == sum(got["kind"].values()) > 0 and got["kind"]["prose"] == 0
    assert tokens <= 4 * cfg.micro_batch * (cfg.seq_len + 1)  # document tokens of the rows (pad left out)
    assert 0 < sum(got["modality"].values()) < tokens  # labels: a piece's last token predicts nothing

    out = json.loads((res.run_dir / "data_mix.json").read_text())
    assert out["step"] == 4 and out["realized"]["tokens"] == tokens
    assert {k: out["realized"][k] for k in ("source", "kind", "modality")} == got
    assert out["realized"]["label_tokens"] == sum(got["modality"].values())
    assert out["realized"]["share"]["source"]["world"] == pytest.approx(got["source"]["world"] / tokens)
    planned = out["planned"]
    assert planned["source"]["world"]["share"] == 0.75 and planned["kind"]["prose"]["tokens_per_epoch"] == 0
    assert planned["kind"]["t2i"]["weight"] == 2.0
    # the checkpoint carries the counts of its step (a resumed run continues from them)
    meta = json.loads((res.run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["mix"] == want[1]
    assert meta["loader"]["sources"][0]["name"] == "world" and meta["loader"]["kind_weights"] == {
        "prose": 0.0, "t2i": 2.0}


def test_changed_mixture_cannot_resume(tiny_args, mix_args, tiny_tokens, tiny_tokens_b):
    train(load_train_config("train/demo", [*tiny_args, *mix_args, "steps=2"]))
    even = f"data=[{{path: {tiny_tokens}, weight: 1, name: world}}, {{path: {tiny_tokens_b}, weight: 1}}]"
    with pytest.raises(UserError, match="data sources changed") as e:
        train(load_train_config("train/demo", [*tiny_args, *mix_args, even, "steps=3"]), resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="kind_weights were"):
        train(load_train_config("train/demo", [*tiny_args, *mix_args, "kind_weights.t2i=3", "steps=3"]),
              resume=True)
    with pytest.raises(UserError, match="cannot resume"):  # back to the first folder alone
        train(load_train_config("train/demo", [*tiny_args, "steps=3"]), resume=True)
    res = train(load_train_config("train/demo", [*tiny_args, *mix_args, "steps=3"]), resume=True)
    assert res.step == 3


def test_curriculum_phase_trains_first_then_the_mixture(tiny_args, mix_args, tiny_tokens_b):
    """A phase of 600 tokens on the second source without t2i: the first steps read only it, later
    steps the regular mixture; the phase is planned in data_mix.json, and a changed curriculum
    cannot resume."""
    name = tiny_tokens_b.name
    phase = f"phases=[{{tokens: 600, weights: {{{name}: 1}}, kind_weights: {{t2i: 0}}}}]"
    cfg = load_train_config("train/demo", [*tiny_args, *mix_args, phase, "steps=6"])
    res = train(cfg)
    want = _expected(cfg, 6)
    first, last = want[0], want[-1]
    assert first["source"]["world"] == 0 and first["kind"]["t2i"] == 0 and first["source"][name] > 0
    assert last["source"]["world"] > 0 and last["kind"]["t2i"] > 0
    out = json.loads((res.run_dir / "data_mix.json").read_text())
    assert {k: out["realized"][k] for k in ("source", "kind", "modality")} == last
    phase_plan = out["planned"]["phases"][0]
    assert phase_plan["tokens"] == 600 and phase_plan["source_share"][name] == pytest.approx(1.0)
    assert phase_plan["kind_share"]["t2i"] == 0
    other = f"phases=[{{tokens: 900, weights: {{{name}: 1}}}}]"
    with pytest.raises(UserError, match="curriculum phases were"):
        train(load_train_config("train/demo", [*tiny_args, *mix_args, other, "steps=7"]), resume=True)
    with pytest.raises(UserError, match="names source 'nowhere'") as e:
        train(load_train_config("train/demo", [*tiny_args[:-1], f"run_dir={res.run_dir}_b", *mix_args,
                                               "phases=[{tokens: 600, weights: {nowhere: 1}}]", "steps=1"]))
    assert "\n" not in str(e.value)


def test_kind_absent_from_every_source_is_a_user_error(tiny_args, mix_args):
    with pytest.raises(UserError, match="'story', which no source holds") as e:
        train(load_train_config("train/demo", [*tiny_args, *mix_args, "kind_weights={story: 2}", "steps=1"]))
    assert "\n" not in str(e.value)


def test_export_finds_the_tokenizer_set_of_a_mixture_run(tiny_tokens, tiny_tokens_b, tiny_tokset, tmp_path):
    import yaml

    from anymodal.train.export import tokenizer_dir

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": [{"path": str(tiny_tokens_b), "weight": 1},
                                                                   str(tiny_tokens)]}))
    assert tokenizer_dir(tmp_path, None).resolve() == tiny_tokset[0].resolve()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": [{"path": str(tmp_path / "gone")}]}))
    with pytest.raises(UserError, match="--tokenizers"):
        tokenizer_dir(tmp_path, None)

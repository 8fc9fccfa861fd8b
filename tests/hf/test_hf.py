"""Hugging Face interchange: export to Chameleon format, load it in `transformers`, generate the same
ids as `anymodal sample`, start training from the folder, and the commands of docs/hf.md."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from anymodal.cli import main
from anymodal.config import load_config
from anymodal.data.mixture import Mixture, parse_sources
from anymodal.data.packing import PackedLoader
from anymodal.errors import UserError
from anymodal.hf import StreamGrammar
from anymodal.hf.export import export_hf
from anymodal.hf.load import init_from_hf, read_hf_folder
from anymodal.hf.tokenizer import hf_text_tokenizer
from anymodal.model import ModelConfig, Transformer, lm_loss
from anymodal.sample.bundle import load_bundle, save_bundle_layout, tiny_bundle
from anymodal.sample.session import SampleOptions, run_sample
from anymodal.tokenizers import build_space
from anymodal.tokenizers.stream import Audio, Box, Image, Text
from anymodal.train.export import export
from anymodal.train.lm import load_train_config, train

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tiny_tokens, tiny_overrides, tmp_path_factory):
    """A tiny model trained 40 steps (its weights are not the initial ones), its bundle and its
    Hugging Face folder, sharded so that the index path is exercised too."""
    root = tmp_path_factory.mktemp("hf")
    res = train(load_train_config("train/demo", [*tiny_overrides, f"data={tiny_tokens}",
                                                 f"run_dir={root / 'run'}", "steps=40", "checkpoint_every=100"]))
    bundle = export(res.run_dir, root / "bundle")
    folder = export_hf(bundle, root / "hf", max_shard_size="40KB")
    return {"run": res.run_dir, "bundle": bundle, "folder": folder, "root": root,
            "overrides": [*tiny_overrides, f"data={tiny_tokens}"]}


def _hf_model(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = transformers.ChameleonForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info, [str(w.message) for w in caught]


def test_text_tokenizer_gives_sentencepiece_ids(text_tokenizer, tmp_path):
    import pydoc_data.topics

    hf = hf_text_tokenizer(text_tokenizer)
    hf.save_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = list(pydoc_data.topics.topics.values())[100:160] + [
        "a small red circle at the top left and a large blue square in the center",
        "find <ref>the red circle</ref><box><loc_3><loc_2><loc_17><loc_16></box>",
        "  two  spaces, a tab\there\nand digits 12345 x=3.25",
        "unicode: é ü ✓ 中文 🙂",
        "<s>typed specials</s><pad> stay text",
        "say: <boi><eoi><boa><eoa>",
    ]
    for s in texts:
        ids = text_tokenizer.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids, s[:60]
        assert auto.encode(s, add_special_tokens=False) == ids, s[:60]
        assert auto.decode(ids) == text_tokenizer.decode(ids) == s
    sp = text_tokenizer.special_ids()
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (sp["bos"], sp["eos"], sp["pad"])


def test_export_loads_in_transformers_with_the_same_logits(trained, tiny_tokset):
    folder, space = trained["folder"], tiny_tokset[1].space
    model, info, caught = _hf_model(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [w for w in caught if "weight" in w.lower()], caught
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded above max_shard_size
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (space.bos, space.eos, space.pad)
    assert (config["boi_token_id"], config["eoi_token_id"]) == (space.boi, space.eoi)
    assert config["image_token_range"] == list(space.image_range())
    assert config["anymodal"]["token_space"] == space.to_dict()
    # what the any-aspect stream needs besides the ranges (StreamGrammar.from_folder reads the budget)
    assert config["anymodal"]["eor_token_id"] == space.eor
    assert config["anymodal"]["image_size_token_range"] == list(space.size_range())
    assert config["anymodal"]["image_max_tokens"] == 16
    assert StreamGrammar.from_folder(folder).max_image_tokens == 16
    readme = (folder / "README.md").read_text()
    assert f"closed by `<eor>` ({space.eor})" in readme and f"<size_n> is id {space.size_range()[0]} + n - 1" in readme
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == space.eos
    for name in ("README.md", "tokenizer.json", "token_space.json", "text/text.model", "image/model.safetensors",
                 "audio/model.safetensors"):
        assert (folder / name).is_file(), name
    # mixed text + image + loc + audio ids: the same logits as ours
    b = load_bundle(trained["bundle"], device="cpu")
    ids, _ = b.stream.encode([Text("a red circle"), Image(np.arange(space.image_tokens).reshape(space.image_grid) % 7),
                              Text("<ref>the red circle</ref>"), Box(0.1, 0.2, 0.6, 0.7), Image(np.arange(6).reshape(2, 3)),
                              Audio(np.ones((3, space.audio_n_q), dtype=np.int64))])
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        ours, theirs = b.model(x), model(x).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_greedy_generate_gives_the_ids_of_anymodal_sample(trained, tmp_path):
    b = load_bundle(trained["bundle"], device="cpu")
    model, _, _ = _hf_model(trained["folder"])
    picture = tmp_path / "scene.png"
    arr = np.full((16, 16, 3), 255, np.uint8)
    arr[2:9, 3:10] = (220, 40, 40)
    PILImage.fromarray(arr).save(picture)
    cases = [("text", "a red circle", ()), ("image then caption", "", (str(picture),)),
             ("grounding", "<ref>the red circle</ref>", (str(picture),))]
    opened = set()
    for name, prompt, images in cases:
        out = tmp_path / name.replace(" ", "_")
        res = run_sample(b, prompt, out, images=images, console=io.StringIO(),
                         opts=SampleOptions(cfg=1.0, temperature="0", max_new_tokens=40))[0]
        prompt_ids = json.loads((out / "tokens.json").read_text())["prompt"]
        n = 40
        grammar = StreamGrammar.from_folder(trained["folder"], max_new_tokens=n)
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, logits_processor=[grammar])
        assert gen[0, len(prompt_ids):].tolist() == res.tokens, name
        opened |= {t for t in res.tokens if t in (b.space.boi, b.space.box, b.space.boa)}
    assert opened, "no generation opened a span: the grammar went untested"


def test_grammar_keeps_spans_whole_where_the_model_would_not():
    sp = tiny_bundle().space
    grammar = StreamGrammar(sp)
    lo, hi = sp.image_range()
    s_lo = sp.size_range()[0]
    ids = torch.tensor([[sp.bos, sp.boi]])
    scores = torch.randn(1, sp.vocab_size)
    scores[0, sp.eoi] = scores[0, lo] = 100.0  # the model wants to close the image at once, or skip its size
    masked = grammar(ids, scores.clone())
    assert torch.isinf(masked[0, sp.eoi]) and torch.isinf(masked[0, lo])
    # only size tokens, h within the image budget (the square grid's 16 codes by default)
    assert torch.isfinite(masked[0]).nonzero()[:, 0].tolist() == list(range(s_lo, s_lo + 16))
    ids = torch.cat([ids, torch.tensor([[s_lo + 1, s_lo + 2]]), torch.full((1, 3), lo)], 1)  # a 2 x 3 grid's first row
    masked = grammar(ids, torch.randn(1, sp.vocab_size))
    assert torch.isfinite(masked[0]).nonzero()[:, 0].tolist() == [sp.eor]  # the row ends after 3 codes
    ids = torch.cat([ids, torch.tensor([[sp.eor, lo, lo, lo, sp.eor]])], 1)  # 2 rows: only <eoi> may follow
    masked = grammar(ids, torch.randn(1, sp.vocab_size))
    assert torch.isfinite(masked[0]).nonzero()[:, 0].tolist() == [sp.eoi]
    # a budget from the export (the image tokenizer's max_tokens) bounds the model's grid
    masked = StreamGrammar(sp, max_image_tokens=6)(torch.tensor([[sp.bos, sp.boi, s_lo + 2]]), torch.randn(1, sp.vocab_size))
    assert torch.isfinite(masked[0]).nonzero()[:, 0].tolist() == [s_lo, s_lo + 1]  # h = 3: w <= 2


def test_grammar_of_a_square_space_is_unchanged():
    t = tiny_bundle().tok
    sp = build_space(t.text, t.image, t.audio, version=1)
    grammar = StreamGrammar(sp)
    lo, hi = sp.image_range()
    ids = torch.tensor([[sp.bos, sp.boi]])
    scores = torch.randn(1, sp.vocab_size)
    scores[0, sp.eoi] = 100.0
    masked = grammar(ids, scores.clone())
    assert lo <= int(masked.argmax()) < hi and torch.isinf(masked[0, sp.eoi])
    assert int(torch.isfinite(masked[0]).sum()) == hi - lo  # only image codes
    ids = torch.cat([ids, torch.full((1, sp.image_tokens), lo)], 1)  # a full grid: only <eoi> may follow
    masked = grammar(ids, torch.randn(1, sp.vocab_size))
    assert torch.isfinite(masked[0]).nonzero()[:, 0].tolist() == [sp.eoi]


def test_export_refuses_what_chameleon_cannot_hold(tmp_path, capsys):
    b = tiny_bundle(model_overrides={"qk_norm": False})
    src = save_bundle_layout(b, tmp_path / "bundle")
    with pytest.raises(UserError, match="qk_norm"):
        export_hf(src, tmp_path / "hf")
    assert main(["export", "--format", "hf", "--bundle", str(src), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qk_norm" in err[0]
    assert not (tmp_path / "hf").exists()
    assert main(["export", "--format", "hf", "--out", str(tmp_path / "x")]) == 2  # neither --run nor --bundle


def test_a_blind_decode_bundle_exports_folded_with_a_note(tmp_path, capsys):
    offset = tiny_bundle().space.image_offset
    b = tiny_bundle(model_overrides={"code_factors": [4, 8], "code_offset": offset, "blind_decode": True,
                                     "tie_embeddings": True})  # 32 image codes: 4 colours x 8 structures
    src = save_bundle_layout(b, tmp_path / "bundle")
    assert load_bundle(src, device="cpu").model.cfg.blind_decode  # the bundle keeps its factors
    folder = export_hf(src, tmp_path / "hf")
    assert "blind_decode" in capsys.readouterr().err
    model, info, _ = _hf_model(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, _ = b.stream.encode([Text("a red circle"), Image(np.arange(b.space.image_tokens).reshape(b.space.image_grid) % 32)])
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():  # the same logits on a given sequence: the codes read whole, as a prompt is
        torch.testing.assert_close(model(x).logits, b.model(x), atol=1e-4, rtol=0)


def _first_batch_loss(bundle_dir, overrides) -> float:
    """The loss of a bundle's model on the first batch a run with these overrides trains on."""
    cfg = load_train_config("train/demo", overrides)
    loader = PackedLoader(Mixture(parse_sources(cfg.data), cfg.kind_weights), cfg.seq_len, cfg.micro_batch, 0, 1,
                          cfg.grad_accum, cfg.seed, cfg.cond_dropout, lookahead=cfg.lookahead)
    batch = next(loader)
    model = load_bundle(bundle_dir, device="cpu").model
    with torch.no_grad():
        logits = model(batch["ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])
        return float(lm_loss(logits, batch["labels"], batch["modality"]).ce)


@pytest.mark.parametrize("init_vocab", ["strict", "map"])
def test_training_from_the_folder_starts_at_the_exported_models_loss(trained, tmp_path, init_vocab):
    run = tmp_path / "run"
    # the preset says 128 wide: the folder's shape (32 wide) wins
    overrides = [*trained["overrides"], f"run_dir={run}", "steps=1", f"init_from={trained['folder']}",
                 f"init_vocab={init_vocab}", "model_preset=model/demo_1m"]
    res = train(load_train_config("train/demo", overrides))
    assert res.model.cfg.dim == 32 and res.model.cfg.n_layers == 2
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    expected = _first_batch_loss(trained["bundle"], overrides)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_init_from_checks_the_token_space_or_maps_rows(trained, tiny_tokset, tmp_path):
    tok_dir, tok = tiny_tokset
    space = tok.space
    other = tmp_path / "other"
    shutil.copytree(trained["folder"], other)
    ts = json.loads((other / "token_space.json").read_text())
    ts["image_codebook_size"] = 64
    (other / "token_space.json").write_text(json.dumps(ts))
    overrides = [*trained["overrides"], f"run_dir={tmp_path / 'run'}", "steps=1", f"init_from={other}"]
    with pytest.raises(UserError, match="init_vocab=map"):
        train(load_train_config("train/demo", overrides))
    # map: rows are matched by what they stand for; a piece the folder lacks keeps its fresh row
    tj = json.loads((other / "tokenizer.json").read_text())
    added = {t["content"] for t in tj["added_tokens"]}
    gone = next(p for p in tj["model"]["vocab"] if len(p) > 3 and p not in added and not p.startswith("<0x"))
    del tj["model"]["vocab"][gone]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    cfg = load_config(ModelConfig, data={**load_bundle(trained["bundle"]).model.cfg.__dict__})
    torch.manual_seed(0)
    fresh = Transformer(cfg)
    before = fresh.tok_emb.weight.detach().clone()
    summary = init_from_hf(fresh, read_hf_folder(other), space, "map", tok.text)
    src = load_bundle(trained["bundle"], device="cpu").model
    n_text, gone_id = space.text_size, tok.text.sp.piece_to_id(gone)
    assert f"text {n_text - 1}/{n_text}" in summary and f"image 0/{space.image_codebook_size}" in summary
    kept = [i for i in range(n_text) if i != gone_id]
    assert torch.equal(fresh.tok_emb.weight[kept], src.tok_emb.weight[kept])
    assert torch.equal(fresh.head.weight[kept], src.head.weight[kept])
    assert torch.equal(fresh.tok_emb.weight[gone_id], before[gone_id])
    lo, hi = space.image_range()
    assert torch.equal(fresh.tok_emb.weight[lo:hi], before[lo:hi])  # other codebook: not mapped
    a_lo, a_hi = space.audio_range()
    assert torch.equal(fresh.tok_emb.weight[a_lo:a_hi], src.tok_emb.weight[a_lo:a_hi])
    assert torch.equal(fresh.layers[0].attn.wqkv.weight, src.layers[0].attn.wqkv.weight)


def _doc_blocks(lang: str) -> list[str]:
    text = (ROOT / "docs" / "hf.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_docs_commands_run(trained, cli_env, tmp_path):
    """Every command of docs/hf.md, with the demo's paths pointed at the tiny run."""
    paths = {"runs/demo/run": str(trained["run"]), "runs/demo/hf": str(tmp_path / "hf"),
             "runs/demo/tokens/train": trained["overrides"][-1].split("=", 1)[1],
             "runs/from_hf": str(tmp_path / "from_hf")}

    def local(s: str) -> str:
        for a, b in paths.items():
            s = s.replace(a, b)
        return s

    bash, python = _doc_blocks("bash"), _doc_blocks("python")
    assert len(bash) == 3 and len(python) == 1
    for block in bash:
        cmd = shlex.split(local(block.strip()))
        assert cmd[0] == "anymodal"
        if cmd[1] == "train":  # the tiny run's settings on top (the doc's steps=50 → 2)
            cmd += [*trained["overrides"][:-1], "steps=2"]
        r = subprocess.run([sys.executable, "-m", "anymodal.cli", *cmd[1:]], cwd=tmp_path, env=cli_env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        if cmd[1] == "export":
            r = subprocess.run([sys.executable, "-c", local(python[0])], cwd=tmp_path, env=cli_env,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
            assert r.stdout.strip().endswith("image codes")
            space = load_bundle(trained["bundle"]).space
            assert len(json.loads((tmp_path / "codes.json").read_text())["ids"]) == space.image_tokens
    with PILImage.open(tmp_path / "image.png") as im:
        assert im.size == (16, 16)
    assert (tmp_path / "from_hf" / "metrics.jsonl").is_file()
    assert os.path.isdir(tmp_path / "hf")

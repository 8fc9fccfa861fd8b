"""`anymodal prepare`: demo-world shards -> token shards that decode back to the raw documents."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from anymodal.data.packing import TokenDataset
from anymodal.data.prepare import prepare
from anymodal.data.reader import iter_documents
from anymodal.errors import UserError
from anymodal.tokenizers.stream import Audio, Box, Image, Text


@pytest.fixture(scope="module")
def tokset(tiny_tokset):
    return tiny_tokset  # tests/conftest.py


def _bad_shard(path):
    """A shard with one good prose document and two bad records."""
    with tarfile.open(path, "w") as tar:
        for name, data in [("good.json", json.dumps({"segments": [{"text": "hello there"}], "kind": "prose"})),
                           ("broken.json", "{not json"),
                           ("nofile.json", json.dumps({"segments": [{"image": "0.png"}], "kind": "i2t"}))]:
            raw = data.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from anymodal.data.world import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, "train", docs=36, seed=0, shard_size=12, progress=False)
    _bad_shard(out / "train-00003.tar")
    return out


@pytest.fixture(scope="module")
def prepared(tokset, world, tmp_path_factory):
    tok_dir, _ = tokset
    out = tmp_path_factory.mktemp("tokens")
    torch.set_num_threads(1)
    stats = prepare(tok_dir, str(world / "train-*.tar"), out, workers=1, progress=False)
    return out, stats


def test_documents_decode_back(tokset, world, prepared):
    _, tok = tokset
    out, stats = prepared
    ds = TokenDataset(out)
    raw = list(iter_documents(str(world / "train-*.tar"), image_size=tok.image.resolution,
                              sample_rate=tok.audio.sample_rate))
    assert len(ds) == len(raw) == stats["docs"] == 37
    assert sum(stats["bad"].values()) == 2 and stats["bad_total"] == 2, stats["bad"]  # bad JSON, missing file
    assert stats["tokens"] == ds.num_tokens == sum(stats["tokens_by_modality"].values())
    assert all(stats["tokens_by_modality"][m] > 0 for m in ("text", "image", "audio", "loc"))
    bins = tok.space.loc_bins
    kinds_seen = set()
    for i, doc in enumerate(raw):  # shards in order, documents in shard order
        ids, mod = ds.doc(i)
        assert ds.kind(i) == doc.kind
        kinds_seen.add(doc.kind)
        np.testing.assert_array_equal(mod, tok.space.modality_of(ids))
        dec = tok.stream.decode(ids)
        assert dec.problems == [] and dec.ended
        # adjacent text segments (a task cue and its answer) read back as one text
        want_segments = []
        for seg in doc.segments:
            if "text" in seg and want_segments and "text" in want_segments[-1]:
                want_segments[-1] = {"text": want_segments[-1]["text"] + seg["text"]}
            else:
                want_segments.append(seg)
        assert len(dec.segments) == len(want_segments)
        for got, want in zip(dec.segments, want_segments):
            if "text" in want:
                assert isinstance(got, Text) and got.text == want["text"]
            elif "image" in want:  # the codes of this very image, encoded alone
                x = torch.from_numpy(want["image"]).permute(2, 0, 1)[None].float() / 255
                assert isinstance(got, Image) and np.array_equal(got.codes, tok.image.encode(x)[0].numpy())
            elif "audio" in want:  # batched by frame count: identical to encoding the clip alone
                codes = tok.audio.encode(torch.from_numpy(want["audio"])[None])[0].numpy()
                assert isinstance(got, Audio) and np.array_equal(got.codes, codes)
            else:
                assert isinstance(got, Box)
                assert np.allclose(got.as_tuple(), want["box"], atol=1 / bins)
        if doc.kind in ("t2i", "a2i", "tts"):  # where the CFG-droppable prompt ends
            opener = tok.space.boa if doc.kind == "tts" else tok.space.boi
            assert ds.cond_start[i] == 1 and ids[ds.cond_end[i]] == opener
        else:
            assert ds.cond_start[i] == ds.cond_end[i] == -1
    assert {"t2i", "a2i", "tts", "asr", "ground", "prose"} <= kinds_seen
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) == 4


def test_resume_and_multiprocess_give_the_same_bytes(tokset, world, prepared, tmp_path):
    tok_dir, _ = tokset
    out, _ = prepared
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir() if p.suffix != ".json"}
    again = prepare(tok_dir, str(world / "train-*.tar"), out, workers=1, progress=False)
    assert again["shards_this_run"] == 0 and again["docs"] == 37  # every shard was finished: nothing redone
    (out / "shards" / "00001.json").unlink()  # as if killed before shard 1 was complete
    redo = prepare(tok_dir, str(world / "train-*.tar"), out, workers=1, progress=False)
    assert redo["shards_this_run"] == 1
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir() if p.suffix != ".json"} == before
    assert (out / "shards" / "00001.json").is_file()
    # two worker processes over two shards, forked (one thread each) and spawned (two threads each):
    # the same bytes as one process
    two = [str(world / "train-00000.tar"), str(world / "train-00001.tar")]
    for threads in (1, 2):
        multi = prepare(tok_dir, two, tmp_path / f"multi{threads}", workers=2, threads=threads, progress=False)
        assert multi["docs"] == 24
        for name in ("00000.ids", "00000.mod", "00000.idx.npy", "00001.ids", "00001.mod", "00001.idx.npy"):
            assert (tmp_path / f"multi{threads}" / "shards" / name).read_bytes() == before[name], (threads, name)


def test_workers_are_forked_only_with_one_cpu_thread_each():
    from anymodal.data.prepare import _pool_context

    fork = "fork" if sys.platform == "linux" else "spawn"
    assert _pool_context(1, "cpu").get_start_method() == fork
    assert _pool_context(2, "cpu").get_start_method() == "spawn"  # GNU OpenMP hangs in a forked child
    assert _pool_context(1, "cuda").get_start_method() == "spawn"


def test_token_space_mismatch_and_strict(tokset, world, prepared, tmp_path):
    tok_dir, tok = tokset
    out, _ = prepared
    other = json.loads((out / "token_space.json").read_text())
    other["image_codebook_size"] += 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "token_space.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="token spaces disagree"):
        prepare(tok_dir, str(world / "train-00000.tar"), bad, workers=1, progress=False)
    with pytest.raises(UserError):
        prepare(tok_dir, str(world / "train-00003.tar"), tmp_path / "strict", workers=1, strict=True,
                progress=False)


def test_cli_prints_stats_and_rejects_bad_input(tokset, world, tmp_path, capsys):
    from anymodal.cli import main

    tok_dir, _ = tokset
    args = ["prepare", "--tokenizers", str(tok_dir), "--input", str(world / "train-00003.tar"), "--out",
            str(tmp_path / "t"), "--workers", "1", "--no-progress"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["docs"] == 1
    assert main([*args[:4], str(tmp_path / "missing.tar"), *args[5:]]) == 2
    assert "anymodal: error: shard not found" in capsys.readouterr().err
    # the real command line, once: a user error is one line and exit code 2, never a traceback
    r = subprocess.run([sys.executable, "-m", "anymodal.cli", "prepare", "--tokenizers", str(tmp_path / "nope"),
                        "--input", str(world / "train-00003.tar"), "--out", str(tmp_path / "u")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "anymodal: error:" in r.stderr and "Traceback" not in r.stderr

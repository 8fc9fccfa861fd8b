"""Corpora at scale: raw shards over HTTP (and a local cache), `prepare` split into parts and merged."""

from __future__ import annotations

import filecmp
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from anymodal.cli import main
from anymodal.data.prepare import merge, prepare
from anymodal.data.reader import RecordCounter, iter_documents
from anymodal.errors import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from anymodal.data.world import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, "train", docs=40, seed=3, shard_size=10, progress=False)
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the world folder; `cut-…` paths send the full length header and hang up halfway."""

    def do_GET(self):
        if self.path.startswith("/cut-"):
            data = (Path(self.directory) / self.path[len("/cut-"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server(world):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(world)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _prepare(tok_dir, src, out, **kw):
    torch.set_num_threads(1)
    return prepare(tok_dir, src, out, workers=1, progress=False, **kw)


def _same_tokens(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "shards").iterdir() if not p.name.endswith(".json"))
    assert names and names == sorted(p.name for p in (b / "shards").iterdir() if not p.name.endswith(".json"))
    for n in names:
        assert filecmp.cmp(a / "shards" / n, b / "shards" / n, shallow=False), n


@pytest.fixture(scope="module")
def local(tiny_tokset, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    _prepare(tiny_tokset[0], str(world / "train-{00000..00003}.tar"), out)
    return out


def test_http_shards_give_the_same_token_shards(tiny_tokset, server, local, tmp_path):
    out = tmp_path / "http"
    stats = _prepare(tiny_tokset[0], f"{server}/train-{{00000..00003}}.tar", out)
    assert stats["docs"] == 40 and stats["bad_total"] == 0
    _same_tokens(local, out)
    # through a local cache: downloaded once, then read from the cache with the server gone quiet
    cache = tmp_path / "cache"
    out2 = tmp_path / "cached"
    _prepare(tiny_tokset[0], f"{server}/train-{{00000..00003}}.tar", out2, cache_dir=cache)
    _same_tokens(local, out2)
    assert len(list(cache.glob("*-train-0000?.tar"))) == 4


def test_a_connection_cut_mid_shard_is_a_counted_bad_shard(server):
    counter = RecordCounter()
    docs = list(iter_documents([f"{server}/train-00000.tar", f"{server}/cut-train-00001.tar"], image_size=16,
                               counter=counter))
    assert counter.bad == {"bad shard": 1}
    assert 10 < len(docs) < 20  # the whole first shard, part of the second (not its last sample in progress)
    with pytest.raises(UserError, match="bad shard"):
        list(iter_documents(f"{server}/cut-train-00001.tar", image_size=16, strict=True))


def test_resampled_shards_never_run_dry_and_are_deterministic(world):
    src = str(world / "train-{00000..00001}.tar")  # 2 shards, 3 readers
    keys = [[d.key for d in iter_documents(src, image_size=16, rank=r, world_size=3, resampled=True,
                                           epoch_docs=25, seed=5)] for r in range(3)]
    assert all(len(k) == 25 for k in keys)
    assert keys[0] != keys[1]
    again = [d.key for d in iter_documents(src, image_size=16, rank=1, world_size=3, resampled=True,
                                           epoch_docs=25, seed=5)]
    assert again == keys[1]


def test_three_parts_and_merge_equal_one_run(tiny_tokset, world, local, tmp_path):
    tok_dir = tiny_tokset[0]
    src = str(world / "train-{00000..00003}.tar")
    shared = tmp_path / "shared"
    for p in (0, 1):
        res = _prepare(tok_dir, src, shared, part=p, parts=3)
        assert res["complete"] is False and not (shared / "manifest.json").exists()
    res = _prepare(tok_dir, src, shared, part=2, parts=3)  # the last part to finish writes the manifest
    assert (shared / "manifest.json").is_file()
    _same_tokens(local, shared)
    want = json.loads((local / "manifest.json").read_text())
    assert json.loads((shared / "manifest.json").read_text()) == want
    # parts in folders of their own, then `prepare --merge OUT --from …` (a part dying midway resumes)
    dirs = [tmp_path / f"part{p}" for p in range(3)]
    for p, d in enumerate(dirs):
        _prepare(tok_dir, src, d, part=p, parts=3)
    with pytest.raises(UserError, match="not done yet"):
        merge(tmp_path / "merged", dirs[:2])
    assert main(["prepare", "--merge", str(tmp_path / "merged"), "--from", *map(str, dirs)]) == 0
    _same_tokens(local, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "manifest.json").read_text()) == want


def test_a_part_with_other_tokenizers_or_inputs_is_refused(tiny_tokset, world, tmp_path):
    from anymodal.sample.bundle import tiny_bundle

    tok_dir = tiny_tokset[0]
    src = str(world / "train-{00000..00003}.tar")
    out = tmp_path / "tokens"
    _prepare(tok_dir, src, out, part=0, parts=2)
    other = tmp_path / "other_tokset"
    shutil.copytree(tok_dir, other)
    t = tiny_bundle(seed=1).tok  # same sizes, other weights: the same token space, other codes
    t.image.save(other / "image")
    with pytest.raises(UserError, match="another tokenizer set"):
        _prepare(other, src, out, part=1, parts=2)
    with pytest.raises(UserError, match="other input shards"):
        _prepare(tok_dir, str(world / "train-{00000..00002}.tar"), out, part=1, parts=2)
    with pytest.raises(UserError, match="--part"):
        _prepare(tok_dir, src, out, part=2, parts=2)
    # one whole run may change its input list, as before parts existed (changed shards are redone)
    stats = _prepare(tok_dir, str(world / "train-{00000..00002}.tar"), out)
    assert stats["shards"] == 3 and stats["docs"] == 30

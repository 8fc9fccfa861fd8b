"""`anymodal prepare --image-mode native`: images of mixed sizes keep their aspect within the
budget, are encoded batched by grid shape, and decode back to exactly those grids and boxes."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from anymodal.cli import main as cli
from anymodal.data.media import encode_png, native_grid
from anymodal.data.packing import TokenDataset
from anymodal.data.prepare import prepare
from anymodal.data.reader import iter_documents
from anymodal.errors import UserError
from anymodal.tokenizers import build_space
from anymodal.tokenizers.stream import Box, Image, Text
from anymodal.tokenizers.token_space import TokenSpace

# (w, h, kind): wide, tall, square and odd scenes; ground documents carry a box in source pixels
SCENES = [(100, 60, "ground"), (64, 48, "t2i"), (48, 64, "i2t"), (64, 64, "ground"), (96, 48, "i2t"),
          (48, 64, "ground"), (64, 48, "i2t"), (33, 70, "t2i")]


def _scene(w: int, h: int, i: int) -> tuple[np.ndarray, list[int]]:
    a = np.full((h, w, 3), 255, np.uint8)
    box = [w // 5, h // 6, w // 5 + w // 3, h // 6 + h // 2]
    a[box[1]:box[3], box[0]:box[2]] = ((60 * i) % 230, 90, 200)
    return a, box


def _mixed_world(path) -> str:
    with tarfile.open(path, "w") as tar:
        for i, (w, h, kind) in enumerate(SCENES):
            img, box = _scene(w, h, i)
            segs = {"ground": [{"image": "0.png"}, {"text": "the square"}, {"box": box, "image_index": 0}],
                    "t2i": [{"text": "a square"}, {"image": "0.png"}],
                    "i2t": [{"image": "0.png"}, {"text": "a square"}]}[kind]
            for name, data in ((f"s{i:03d}.json", json.dumps({"segments": segs, "kind": kind}).encode()),
                               (f"s{i:03d}.0.png", encode_png(img))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return _mixed_world(tmp_path_factory.mktemp("mixed") / "mixed-00000.tar")


@pytest.fixture(scope="module")
def native(tiny_tokset, mixed, tmp_path_factory):
    tok_dir, _ = tiny_tokset
    out = tmp_path_factory.mktemp("native")
    torch.set_num_threads(1)
    return out, prepare(tok_dir, mixed, out, workers=1, image_mode="native", progress=False)


def test_native_documents_hold_each_image_at_its_own_grid(tiny_tokset, mixed, native):
    _, tok = tiny_tokset
    out, stats = native
    budget = tok.image.max_tokens
    assert budget == 16 and tok.image.downsample == 4  # the tiny set: 16 px square, 4x4 codes
    assert stats["docs"] == len(SCENES) and stats["bad_total"] == 0
    assert (stats["image_mode"], stats["max_image_tokens"]) == ("native", budget)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["image_mode"], manifest["max_image_tokens"]) == ("native", budget)
    shard_space = TokenSpace.load(out)
    assert shard_space.differences(tok.space) == [] and shard_space.version == 2 and shard_space.any_aspect
    raw = list(iter_documents(mixed, **tok.image.cfg.model.reader_args("native"), sample_rate=tok.audio.sample_rate))
    ds = TokenDataset(out)
    assert len(ds) == len(raw)
    bins = tok.space.loc_bins
    grids = set()
    for i, ((w, h, kind), doc) in enumerate(zip(SCENES, raw)):
        ids, _ = ds.doc(i)
        dec = tok.stream.decode(ids)
        assert dec.problems == [] and dec.ended and ds.kind(i) == kind
        images = [s for s in dec.segments if isinstance(s, Image)]
        assert len(images) == 1
        grid = native_grid(w, h, budget)
        grids.add(grid)
        assert images[0].codes.shape == grid, (w, h)
        # the codes of this very image, encoded alone at its own size
        x = torch.from_numpy(doc.images[0]).permute(2, 0, 1)[None].float() / 255
        assert x.shape[2:] == (grid[0] * 4, grid[1] * 4)
        assert np.array_equal(images[0].codes, tok.image.encode(x)[0].numpy())
        boxes = [s for s in dec.segments if isinstance(s, Box)]
        if kind == "ground":
            _, box = _scene(w, h, i)
            want = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)  # relative to the image's own w and h
            assert np.allclose(boxes[0].as_tuple(), want, atol=1 / bins), (boxes[0], want)
        else:
            assert boxes == [] and any(isinstance(s, Text) for s in dec.segments)
    assert len(grids) >= 4  # several shapes went through the encoder: one call per shape


def test_default_mode_is_the_tokenizers_and_a_changed_mode_is_refused(tiny_tokset, mixed, native, tmp_path):
    tok_dir, tok = tiny_tokset
    out, _ = native
    square = prepare(tok_dir, mixed, tmp_path / "sq", workers=1, progress=False)
    assert (square["image_mode"], square["max_image_tokens"]) == ("resize", None)
    ds = TokenDataset(tmp_path / "sq")
    for i in range(len(ds)):
        images = [s for s in tok.stream.decode(ds.doc(i)[0]).segments if isinstance(s, Image)]
        assert images[0].codes.shape == (4, 4)
    with pytest.raises(UserError, match="image_mode"):
        prepare(tok_dir, mixed, out, workers=1, progress=False)  # resize into a native folder
    with pytest.raises(UserError, match="max_image_tokens"):
        prepare(tok_dir, mixed, out, workers=1, image_mode="native", max_image_tokens=8, progress=False)
    again = prepare(tok_dir, mixed, out, workers=1, image_mode="native", progress=False)
    assert again["shards_this_run"] == 0 and again["image_mode"] == "native"
    # a budget alone means native
    small = prepare(tok_dir, mixed, tmp_path / "small", workers=1, max_image_tokens=6, progress=False)
    assert (small["image_mode"], small["max_image_tokens"]) == ("native", 6)
    with pytest.raises(UserError):
        prepare(tok_dir, mixed, tmp_path / "x", workers=1, image_mode="resize", max_image_tokens=6, progress=False)
    with pytest.raises(UserError):
        prepare(tok_dir, mixed, tmp_path / "x", workers=1, image_mode="stretch", progress=False)


def test_a_square_only_token_space_refuses_native(tiny_tokset, mixed, tmp_path):
    tok_dir, tok = tiny_tokset
    old = tmp_path / "v1"
    shutil.copytree(tok_dir, old)
    build_space(tok.text, tok.image, tok.audio, version=1).save(old / "token_space.json")
    with pytest.raises(UserError, match="version 2"):
        prepare(old, mixed, tmp_path / "o", workers=1, image_mode="native", progress=False)


def test_cli_native_with_a_budget(tiny_tokset, mixed, tmp_path, capsys):
    tok_dir, _ = tiny_tokset
    args = ["prepare", "--tokenizers", str(tok_dir), "--input", mixed, "--workers", "1", "--no-progress"]
    assert cli([*args, "--out", str(tmp_path / "a"), "--image-mode", "native", "--max-image-tokens", "24"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["image_mode"] == "native" and line["max_image_tokens"] == 24 and line["docs"] == len(SCENES)
    for bad in (["--max-image-tokens", "0"], ["--image-mode", "letterbox", "--max-image-tokens", "8"]):
        capsys.readouterr()
        assert cli([*args, "--out", str(tmp_path / "b"), *bad]) == 2, bad
        assert "anymodal: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's choices
        cli([*args, "--out", str(tmp_path / "b"), "--image-mode", "square"])
    assert e.value.code == 2

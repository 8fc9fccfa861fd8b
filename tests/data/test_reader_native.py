"""The reader's native image mode: each image keeps its aspect on the nearest grid within a token
budget, and boxes mapped through that resize stay exact (each axis relative to its own side)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anymodal.data.checker import analyse_image
from anymodal.data.media import encode_png, native_grid
from anymodal.data.reader import decode_sample, iter_documents, iter_images
from anymodal.errors import UserError
from anymodal.tokenizers.stream import Box, Image, box_to_bins

from .test_reader import write_tar


def scene(w: int, h: int, box: tuple[int, int, int, int], colour=(40, 80, 220)) -> np.ndarray:
    a = np.full((h, w, 3), 255, np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = colour
    return a


def ground_doc(key: str, w: int, h: int, box: tuple[int, int, int, int]) -> list[tuple[str, bytes]]:
    rec = {"segments": [{"image": "0.png"}, {"text": "the blue square"}, {"box": list(box), "image_index": 0}],
           "kind": "ground"}
    return [(f"{key}.json", json.dumps(rec).encode()), (f"{key}.0.png", encode_png(scene(w, h, box)))]


def test_box_is_exact_through_a_native_resize(tmp_path, stream, token_space):
    box = (20, 10, 60, 30)  # pixels of a 100 x 60 image
    path = write_tar(tmp_path / "n.tar", ground_doc("wide", 100, 60, box))
    d = next(iter_documents(path, image_size=None, image_mode="native", image_factor=8, max_image_tokens=64))
    img, got = d.images[0], d.segments[2]["box"]
    rows, cols = native_grid(100, 60, 64)
    assert (rows, cols) == (6, 10) and img.shape == (48, 80, 3)  # 5:3 kept exactly, 60 of 64 codes
    # normalized by the image's own width and height, before and after the resize alike
    assert got == (20 / 100, 10 / 60, 60 / 100, 30 / 60)
    found = [o for o in analyse_image(img) if o["colour"] == "blue"]
    assert len(found) == 1
    assert np.abs(np.array(found[0]["box"]) - np.array(got) * (80, 48, 80, 48)).max() <= 1.5, found
    # <loc> bins: x over the width, y over the height (not over a square's side)
    bins = token_space.loc_bins
    assert box_to_bins(got, bins) == (int(0.2 * bins), int(bins / 6), int(0.6 * bins), bins // 2)
    ids, _ = stream.encode([Image(np.zeros((rows, cols), np.int64)), Box(*got)])
    back = stream.decode(ids)
    assert back.problems == [] and back.segments[0].codes.shape == (rows, cols)
    assert np.allclose(back.segments[1].as_tuple(), got, atol=1 / bins)


@pytest.mark.parametrize("w,h", [(100, 60), (60, 100), (64, 64), (300, 40), (33, 17)])
def test_native_grids_follow_the_budget_and_aspect(tmp_path, w, h):
    files = ground_doc("a", w, h, (0, 0, w // 2, h // 2))
    path = write_tar(tmp_path / "a.tar", files)
    for budget, factor in ((16, 4), (64, 8), (256, 16)):
        img = next(iter_images(path, image_size=None, image_mode="native", image_factor=factor,
                               max_image_tokens=budget))
        rows, cols = native_grid(w, h, budget)
        assert img.shape == (rows * factor, cols * factor, 3) and rows * cols <= budget
        # within a code's rounding of the source aspect on the shorter side
        assert abs(np.log(cols / rows / (w / h))) <= np.log1p(1 / min(rows, cols)) + 1e-9, (budget, rows, cols)


def test_native_budget_defaults_to_the_square_grid_and_old_calls_still_work(tmp_path):
    path = write_tar(tmp_path / "d.tar", ground_doc("d", 100, 60, (20, 10, 60, 30)))
    img = next(iter_images(path, image_size=64, image_mode="native", image_factor=8))  # (64/8)^2 = 64 codes
    assert img.shape == (48, 80, 3)
    assert next(iter_images(path, image_size=64)).shape == (64, 64, 3)  # resize, as before
    assert next(iter_images(path, image_size=64, image_mode="letterbox")).shape == (64, 64, 3)
    sample = {"__key__": "d", "__shard__": "mem", "json": json.dumps(
        {"segments": [{"image": "0.png"}, {"box": [20, 10, 60, 30]}]}).encode(),
        "0.png": encode_png(scene(100, 60, (20, 10, 60, 30)))}
    doc = decode_sample(sample, image_size=None, image_mode="native", image_factor=4, max_image_tokens=15)
    assert doc.images[0].shape == (12, 20, 3) and doc.segments[1]["box"] == (0.2, 10 / 60, 0.6, 0.5)
    for kw in ({"image_mode": "stretch"}, {"image_mode": "native", "image_size": None},
               {"image_mode": "native", "max_image_tokens": 0}):
        with pytest.raises(UserError):
            next(iter_documents(path, **{"image_size": 64, **kw}))

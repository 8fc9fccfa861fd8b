"""The raw corpus reader: bad records, OBELICS/MMC4/pair adapters, shard patterns and splits."""

from __future__ import annotations

import base64
import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from anymodal.data.media import encode_png, encode_wav
from anymodal.data.reader import (
    BadRecord,
    RecordCounter,
    decode_sample,
    expand_shards,
    iter_audio,
    iter_documents,
    iter_images,
)
from anymodal.errors import UserError


def write_tar(path, files: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def solid(w=20, h=10, colour=(220, 40, 40)) -> np.ndarray:
    a = np.full((h, w, 3), 255, np.uint8)
    a[2:8, 4:12] = colour
    return a


def doc(key, segments, kind="t2i", **files):
    out = [(f"{key}.json", json.dumps({"segments": segments, "kind": kind, "meta": {"k": key}}).encode())]
    return out + [(f"{key}.{n}", b) for n, b in files.items()]


def jpeg_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)).astype(np.float32)


@pytest.fixture()
def bad_shard(tmp_path):
    png, wav = encode_png(solid()), encode_wav(TONE, 16000)
    files = []
    files += doc("good0", [{"text": "a red box"}, {"image": "0.png"}, {"box": [4, 2, 12, 8], "image_index": 0}],
                 **{"0.png": png})
    files += doc("trunc", [{"image": "0.png"}], **{"0.png": png[: len(png) // 2]})
    files += doc("notimg", [{"image": "0.png"}], **{"0.png": b"this is not an image at all"})
    files += doc("badwav", [{"audio": "0.wav"}], **{"0.wav": b"RIFF\x10\x00\x00\x00WAVEjunkjunk"})
    files += [("badjson.json", b'{"segments": [{"text": "unterminated'), ("badjson.0.png", png)]
    files += doc("good1", [{"audio": "0.wav"}, {"text": "a tone"}], kind="asr", **{"0.wav": wav})
    files += doc("boxout", [{"image": "0.png"}, {"box": [4, 2, 25, 8], "image_index": 0}], **{"0.png": png})
    files += doc("missing", [{"text": "x"}, {"image": "1.png"}], **{"0.png": png})
    files += doc("emptywav", [{"audio": "0.wav"}], **{"0.wav": b""})
    files += doc("zerowav", [{"audio": "0.wav"}], **{"0.wav": encode_wav(np.zeros(0, np.float32), 16000)})
    files += doc("good2", [{"text": "only text"}], kind="prose")
    return write_tar(tmp_path / "bad-00000.tar", files)


def test_bad_records_are_skipped_counted_and_warned_once(bad_shard, caplog):
    counter = RecordCounter()
    with caplog.at_level(logging.WARNING, logger="anymodal.data"):
        docs = list(iter_documents(bad_shard, image_size=20, counter=counter))
    assert [d.key for d in docs] == ["good0", "good1", "good2"]
    assert counter.good == 3
    assert dict(counter.bad) == {"bad image": 2, "bad audio": 1, "bad json": 1, "box outside image": 1,
                                 "missing file": 1, "empty audio": 2}
    per_record = [r.getMessage() for r in caplog.records if "skipping bad record" in r.getMessage()]
    assert len(per_record) == 8
    for key in ("trunc", "notimg", "badwav", "badjson", "boxout", "missing", "emptywav", "zerowav"):
        lines = [m for m in per_record if f" {key} " in m]
        assert len(lines) == 1 and bad_shard in lines[0] and "\n" not in lines[0]
    summary = [r.getMessage() for r in caplog.records if "skipped 8 bad records" in r.getMessage()]
    assert len(summary) == 1 and "read 3 documents" in counter.report()
    # the good ones decoded right: the box follows the (resized) image, audio at 16 kHz
    d0 = docs[0]
    assert d0.images[0].shape == (20, 20, 3)
    assert d0.segments[2]["box"] == pytest.approx((4 / 20, 2 / 10, 12 / 20, 8 / 10))
    assert np.allclose(docs[1].audio[0], TONE, atol=1e-4)


def test_strict_raises_user_error_on_first_bad_record(bad_shard):
    it = iter_documents(bad_shard, strict=True)
    assert next(it).key == "good0"
    with pytest.raises(UserError, match="trunc"):
        next(it)


def test_truncated_shard_keeps_what_came_before(tmp_path, caplog):
    files = []
    for i in range(6):
        files += doc(f"d{i}", [{"text": "t" * 2000}])
    path = write_tar(tmp_path / "t.tar", files)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    counter = RecordCounter()
    with caplog.at_level(logging.WARNING, logger="anymodal.data"):
        docs = list(iter_documents(path, counter=counter))
    assert 1 <= len(docs) < 6 and counter.bad["bad shard"] == 1


def test_obelics_and_mmc4_records_round_trip(tmp_path):
    a, b = solid(colour=(40, 80, 220)), solid(w=30, h=30, colour=(40, 170, 60))
    png_a, jpg_b = encode_png(a), jpeg_bytes(b)
    obelics = {"texts": ["first paragraph", None, "second", None], "metadata": {"url": "x"},
               "images": [None, "0.png", None, base64.b64encode(jpg_b).decode()]}
    mmc4 = {"text_list": ["one", "two"], "image_info": [{"image_name": "pic.png", "matched_text_index": 1}]}
    uri = "data:image/png;base64," + base64.b64encode(png_a).decode()
    obelics_uri = {"texts": [None, "caption"], "images": [{"bytes": base64.b64encode(png_a).decode()}, None]}
    files = [("ob.json", json.dumps(obelics).encode()), ("ob.0.png", png_a),
             ("mm.json", json.dumps(mmc4).encode()), ("mm.pic.png", png_a),
             ("ob2.json", json.dumps(obelics_uri).encode()),
             ("ob3.json", json.dumps({"texts": ["t", None], "images": [None, uri]}).encode()),
             ("pair.jpg", jpeg_bytes(b)), ("pair.txt", b"a green box\n"),
             ("ob4.json", json.dumps({"texts": [None], "images": ["http://example.com/x.jpg"]}).encode())]
    path = write_tar(tmp_path / "ob.tar", files)
    counter = RecordCounter()
    docs = {d.key: d for d in iter_documents(path, image_size=None, counter=counter)}
    assert counter.bad == {"missing file": 1}  # the remote URL is not in the shard
    ob = docs["ob"]
    assert [next(iter(s)) for s in ob.segments] == ["text", "image", "text", "image"]
    assert ob.segments[0]["text"] == "first paragraph" and ob.kind == "interleaved" and ob.meta == {"url": "x"}
    assert np.array_equal(ob.segments[1]["image"], a)
    assert np.abs(ob.segments[3]["image"].astype(int) - b).mean() < 8  # JPEG from base64
    mm = docs["mm"]
    assert [next(iter(s)) for s in mm.segments] == ["text", "image", "text"]
    assert np.array_equal(mm.segments[1]["image"], a)
    assert np.array_equal(docs["ob2"].images[0], a) and docs["ob2"].text == "caption"
    assert np.array_equal(docs["ob3"].images[0], a)
    assert docs["pair"].kind == "pair" and docs["pair"].text == "a green box"


def _modes():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:4, :, 3] = 0  # transparent top half -> white
    i16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pt = p.copy()
    pt.info["transparency"] = 1
    return {
        "L": (Image.fromarray(np.full((8, 8), 77, np.uint8)), lambda a: np.all(a == 77)),
        "LA": (Image.fromarray(np.dstack([np.full((8, 8), 50, np.uint8), np.full((8, 8), 0, np.uint8)])),
               lambda a: np.all(a == 255)),
        "RGBA": (Image.fromarray(rgba),
                 lambda a: np.all(a[:4] == 255) and np.all(a[4:] == (200, 0, 0))),
        "P": (p, lambda a: np.all(a == (10, 200, 30))),
        "P+transparency": (pt, lambda a: np.all(a == 255)),
        "CMYK": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), lambda a: np.all(a == (255, 0, 0))),
        "I;16": (Image.fromarray(i16),
                 lambda a: a[0, 0, 0] == 0 and a[-1, -1, 0] == round(63000 / 257) and np.all(a[..., 0] == a[..., 2])),
        "1": (Image.new("1", (8, 8), 1), lambda a: np.all(a == 255)),
        "F": (Image.fromarray(np.full((8, 8), 0.5, np.float32)), lambda a: np.all(np.abs(a.astype(int) - 128) <= 1)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_image_modes_become_rgb(mode, tmp_path):
    from anymodal.data.media import load_image

    img, check = _modes()[mode]
    fmt = "TIFF" if mode in ("CMYK", "I;16", "F") else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    arr = load_image(buf.getvalue(), size=8)
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 3)
    assert check(arr), arr[..., 0]
    big = load_image(buf.getvalue(), size=16)  # and any size
    assert big.shape == (16, 16, 3)


def test_letterbox_and_resize_transform_boxes(tmp_path):
    from anymodal.data.checker import analyse_image

    a = np.full((50, 100, 3), 255, np.uint8)
    a[10:30, 20:60] = (40, 80, 220)  # a blue rectangle at pixels x 20-60, y 10-30
    files = doc("r", [{"image": "0.png"}, {"box": [20, 10, 60, 30], "image_index": 0}], **{"0.png": encode_png(a)})
    path = write_tar(tmp_path / "lb.tar", files)
    for mode in ("resize", "letterbox"):
        d = next(iter_documents(path, image_size=64, image_mode=mode))
        img, box = d.images[0], np.array(d.segments[1]["box"])
        assert img.shape == (64, 64, 3)
        found = [o for o in analyse_image(img) if o["colour"] == "blue"]
        assert len(found) == 1
        assert np.abs(np.array(found[0]["box"]) / 64 - box).max() <= 1.5 / 64, (mode, found, box * 64)
        if mode == "letterbox":
            assert box == pytest.approx((20 * 0.64 / 64, (16 + 10 * 0.64) / 64, 60 * 0.64 / 64, (16 + 30 * 0.64) / 64))
            assert np.all(img[:15] == 255) and np.all(img[-15:] == 255)  # white bars


def test_load_audio_any_rate_and_channels(tmp_path):
    from scipy.io import wavfile

    from anymodal.data.media import load_audio

    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t)], 1)
    wavfile.write(tmp_path / "s.wav", 44100, (stereo * 20000).astype(np.int16))
    wavfile.write(tmp_path / "f.wav", 8000, np.sin(2 * np.pi * 300 * np.arange(8000) / 8000).astype(np.float32))
    for name, amp in (("s.wav", 20000 / 32768), ("f.wav", 1.0)):
        w = load_audio(tmp_path / name, 16000)
        assert w.dtype == np.float32 and len(w) == 16000
        ref = amp * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)
        assert np.abs(w[200:-200] - ref[200:-200]).max() < 0.02
    assert len(load_audio(tmp_path / "s.wav", 16000, max_seconds=0.25)) == 4000
    with pytest.raises(BadRecord) as e:
        load_audio(b"", 16000)
    assert e.value.reason == "empty audio"
    with pytest.raises(BadRecord) as e:
        load_audio(tmp_path / "nope.wav", 16000)
    assert e.value.reason == "missing file"


def test_shard_patterns_ranks_and_workers(tmp_path):
    paths = []
    for s in range(4):
        files = []
        for i in range(5):
            files += doc(f"s{s}d{i}", [{"text": f"{s}-{i}"}], kind="prose")
        paths.append(write_tar(tmp_path / f"part-{s:05d}.tar", files))
    every = [f"{s}-{i}" for s in range(4) for i in range(5)]
    texts = lambda it: [d.text for d in it]  # noqa: E731
    assert texts(iter_documents(str(tmp_path / "part-*.tar"))) == every
    assert texts(iter_documents(str(tmp_path / "part-{00000..00003}.tar"))) == every
    assert texts(iter_documents(tmp_path)) == every
    assert texts(iter_documents(paths[1:2] + paths[0:1])) == every[5:10] + every[:5]
    assert texts(iter_documents(f"pipe:cat {paths[2]}")) == every[10:15]
    # ranks: shards split, together all documents exactly once
    parts = [texts(iter_documents(paths, rank=r, world_size=2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(every) and not set(parts[0]) & set(parts[1])
    # more readers than shards: split by sample instead
    parts = [texts(iter_documents(paths[:1], rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(every[:5]) and all(parts)
    # shuffling is a permutation fixed by the seed
    sh = texts(iter_documents(paths, shuffle=True, seed=3, shuffle_buffer=4))
    assert sorted(sh) == sorted(every) and sh != every
    assert sh == texts(iter_documents(paths, shuffle=True, seed=3, shuffle_buffer=4))
    for bad in (str(tmp_path / "none-*.tar"), str(tmp_path / "missing.tar"), []):
        with pytest.raises(UserError):
            expand_shards(bad)


def test_dataloader_workers_split_shards(tmp_path):
    import torch

    paths = []
    for s in range(4):
        files = []
        for i in range(3):
            files += doc(f"s{s}d{i}", [{"text": f"{s}-{i}"}], kind="prose")
        paths.append(write_tar(tmp_path / f"w-{s}.tar", files))

    class Texts(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (d.text for d in iter_documents(paths))

    got = list(torch.utils.data.DataLoader(Texts(), batch_size=None, num_workers=2))
    assert sorted(got) == sorted(f"{s}-{i}" for s in range(4) for i in range(3))


def test_iter_images_and_audio(bad_shard):
    imgs = list(iter_images(bad_shard, image_size=32))
    assert len(imgs) == 1 and imgs[0].shape == (32, 32, 3)
    auds = list(iter_audio(bad_shard, sample_rate=8000))
    assert len(auds) == 1 and len(auds[0]) == 4000
    counter = RecordCounter()
    texts = [d.text for d in iter_documents(bad_shard, decode_media=False, counter=counter)]
    # text only: media are not decoded, so only JSON and missing-file problems remain visible
    assert texts == ["a red box", "a tone", "only text"]
    assert dict(counter.bad) == {"bad json": 1, "missing file": 1, "empty audio": 1}


def test_decode_sample_direct():
    sample = {"__key__": "k", "__shard__": "mem", "json": b'{"segments": [{"text": "hi"}]}'}
    assert decode_sample(sample).text == "hi"
    with pytest.raises(BadRecord) as e:
        decode_sample({**sample, "json": b'{"segments": [{"image": "0.png", "text": "both"}]}'})
    assert e.value.reason == "bad segment"
    with pytest.raises(BadRecord) as e:
        decode_sample({**sample, "json": b'{"segments": []}'})
    assert e.value.reason == "bad segment"


def test_failing_pipe_is_a_bad_shard(tmp_path):
    counter = RecordCounter()
    assert list(iter_documents("pipe:exit 3", counter=counter)) == []
    assert counter.bad["bad shard"] >= 1


def test_stopping_early_on_a_pipe_is_no_error(tmp_path, caplog):
    files = []
    for i in range(50):
        files += doc(f"d{i}", [{"text": "x" * 5000}])
    path = write_tar(tmp_path / "p.tar", files)
    counter = RecordCounter()
    it = iter_documents(f"pipe:cat {path}", counter=counter)
    assert next(it).key == "d0"
    it.close()
    assert counter.total_bad == 0

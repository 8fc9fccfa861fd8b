"""Stream: documents of every segment kind round-trip; malformed id sequences are reported."""

import numpy as np
import pytest

from anymodal.errors import UserError
from anymodal.modality import Modality
from anymodal.tokenizers.stream import (
    Audio,
    Box,
    Image,
    Text,
    bins_to_box,
    box_to_bins,
    box_to_pixels,
    dequantize,
    iou,
    pixels_to_box,
    quantize,
)


def make_doc(rng):
    return [
        Text("a small red circle at the top left"),
        Image(rng.integers(0, 32, size=(4, 4))),
        Text("<ref>the red circle</ref>"),
        Box(0.0, 0.25, 0.5, 1.0),
        Text(" then say: "),
        Audio(rng.integers(0, 16, size=(7, 3))),
        Text("ok 😀"),
    ]


def test_every_segment_kind_round_trips(stream):
    doc = make_doc(np.random.default_rng(0))
    ids, mod = stream.encode(doc)
    s = stream.space
    assert ids[0] == s.bos and ids[-1] == s.eos and ids.dtype == np.int64 and mod.dtype == np.uint8
    assert (mod == Modality.IMAGE).sum() == 16 and (mod == Modality.AUDIO).sum() == 21 and (mod == Modality.LOC).sum() == 4
    # frame-major audio: consecutive audio tokens cycle through levels 0, 1, 2
    aud = ids[mod == Modality.AUDIO]
    assert ((aud - s.audio_offset) // 16).tolist() == [0, 1, 2] * 7
    out = stream.decode(ids)
    assert out.problems == [] and out.ended
    assert out.segments[0] == doc[0] and out.segments[1] == doc[1] and out.segments[2] == doc[2]
    box = out.segments[3]
    assert box_to_bins(box.as_tuple(), 64) == box_to_bins(doc[3].as_tuple(), 64)
    assert out.segments[4:] == doc[4:]


def test_decode_reports_malformed_instead_of_raising(stream):
    s = stream.space
    good, _ = stream.encode(make_doc(np.random.default_rng(1)))
    cases = {
        "truncated image": [s.bos, s.boi] + [s.image_id(1)] * 5,
        "image interrupted by text": [s.bos, s.boi, s.image_id(1), 50, s.eoi],
        "wrong audio level": [s.bos, s.boa, s.audio_id(0, 1), s.audio_id(2, 1), s.audio_id(1, 1), s.audio_id(2, 2), s.eoa],
        "partial audio frame": [s.boa, s.audio_id(0, 1), s.audio_id(1, 1), s.eoa],
        "short box": [s.box, s.loc_id(1), s.loc_id(2), s.ebox],
        "stray codes": [s.image_id(3), s.audio_id(1, 1), s.loc_id(4), s.eoi],
        "out of vocab": [-5, s.vocab_size + 10, s.used_size],
        "after eos": list(good) + [50, 51],
    }
    for name, ids in cases.items():
        out = stream.decode(ids)
        assert out.problems, name
    # a frame with a wrong level is skipped but whole frames survive
    out = stream.decode(cases["wrong audio level"])
    audio = [seg for seg in out.segments if isinstance(seg, Audio)][0]
    assert audio.codes.tolist() == [[1, 1, 2]]
    # the good prefix of a truncated document still decodes
    out = stream.decode(good[: len(good) // 2])
    assert isinstance(out.segments[1], Image) and not out.ended


def test_decode_random_ids_never_raises(stream):
    rng = np.random.default_rng(2)
    for _ in range(200):
        ids = rng.integers(-2, stream.space.vocab_size + 2, size=rng.integers(0, 60))
        stream.decode(ids)


def test_encode_rejects_bad_segments(stream):
    with pytest.raises(UserError, match="grid"):
        stream.encode([Image(np.zeros((3, 4), dtype=np.int64))])
    with pytest.raises(UserError, match="out of range"):
        stream.encode([Image(np.full((4, 4), 32))])
    with pytest.raises(UserError, match="expected"):
        stream.encode([Audio(np.zeros((2, 2), dtype=np.int64))])
    with pytest.raises(UserError, match="inside"):
        stream.encode([Box(0.5, 0.5, 0.2, 0.9)])


def test_box_quantization_edges():
    assert quantize(0.0, 64) == 0 and quantize(1.0, 64) == 63 and quantize(0.999, 64) == 63
    assert quantize(-0.1, 64) == 0 and quantize(0.5, 64) == 32
    assert dequantize(0, 64) == pytest.approx(0.5 / 64) and dequantize(63, 64) == pytest.approx(63.5 / 64)
    assert box_to_bins((0.0, 0.0, 1.0, 1.0), 1000) == (0, 0, 999, 999)
    b = bins_to_box((3, 2, 17, 16), 64)
    assert box_to_bins(b.as_tuple(), 64) == (3, 2, 17, 16)


def test_pixels_and_iou():
    b = pixels_to_box([3, 2, 17, 16], 64, 64)
    assert box_to_pixels(b, 64, 64) == pytest.approx((3, 2, 17, 16))
    assert box_to_pixels(pixels_to_box([10, 20, 30, 40], 200, 100), 200, 100) == pytest.approx((10, 20, 30, 40))
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_iou_values_and_boxes_without_area():
    """The one IoU (torchvision.ops.box_iou underneath): exact values, Box or tuples, any units; a
    box with no area (inverted, a line, a point, NaN) has IoU 0.0 with everything, itself too."""
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)  # pixels
    assert iou(Box(0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.0625 / 0.4375)
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(0.25)  # one inside the other
    assert iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
    assert iou(Box(0.1, 0.2, 0.6, 0.9), Box(0.1, 0.2, 0.6, 0.9)) == pytest.approx(1.0)
    inverted = (2, 2, 0, 0)  # x2 < x1 and y2 < y1: would have area +4 by the bare formula
    for other in ((0, 0, 2, 2), (0, 0, 1, 1), inverted, (2, 0, 0, 2)):
        assert iou(inverted, other) == 0.0 and iou(other, inverted) == 0.0
    assert iou((2, 0, 0, 2), (0, 0, 2, 2)) == 0.0  # inverted in x only
    assert iou((0, 0, 0, 2), (0, 0, 2, 2)) == 0.0  # a line
    assert iou((0, 0, float("nan"), 1), (0, 0, 1, 1)) == 0.0
    assert isinstance(iou((0, 0, 1, 1), (0, 0, 1, 1)), float)

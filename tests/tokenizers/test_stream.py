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
    # 16 codes, two size tokens and four row ends
    assert (mod == Modality.IMAGE).sum() == 16 + 2 + 4 and (mod == Modality.AUDIO).sum() == 21 and (mod == Modality.LOC).sum() == 4
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
        stream.encode([Image(np.zeros((3, 4, 1), dtype=np.int64))])
    with pytest.raises(UserError, match="sides"):
        stream.encode([Image(np.zeros((1, stream.space.image_max_side + 1), dtype=np.int64))])
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


# ---- any-aspect images (version 2) -------------------------------------------------------------
def test_image_segments_carry_their_grid(stream):
    s = stream.space
    rng = np.random.default_rng(3)
    for h, w in ((4, 4), (2, 6), (5, 1), (1, 7)):
        codes = rng.integers(0, 32, size=(h, w))
        ids, mod = stream.encode([Text("x"), Image(codes)], bos=False, eos=False)
        start = list(ids).index(s.boi)
        span = ids[start:].tolist()
        assert len(span) == s.image_span(h, w)
        assert span[:3] == [s.boi, s.size_id(h), s.size_id(w)] and span[-1] == s.eoi
        rows = np.asarray(span[3:-1]).reshape(h, w + 1)
        assert (rows[:, -1] == s.eor).all() and np.array_equal(rows[:, :-1] - s.image_offset, codes)
        assert (mod[start + 1 : start + len(span) - 1] == Modality.IMAGE).all()  # <boi>, <eoi> are text
        out = stream.decode(ids)
        assert out.problems == [] and out.segments[1] == Image(codes)


def test_ragged_and_truncated_images_are_recovered_and_reported(stream):
    s = stream.space
    c = [s.image_id(k) for k in range(32)]
    head = [s.boi, s.size_id(3), s.size_id(2)]
    # a short row is padded with the code above it, a long one cut
    out = stream.decode(head + [c[1], c[2], s.eor, c[3], s.eor, c[5], c[6], c[7], s.eor, s.eoi])
    assert out.segments[0].codes.tolist() == [[1, 2], [3, 2], [5, 6]]
    assert "2 rows of the wrong length" in out.problems[0]
    # truncated mid-row (a length cut): the missing rows repeat the last one
    out = stream.decode(head + [c[1], c[2], s.eor, c[4]])
    assert out.segments[0].codes.tolist() == [[1, 2], [4, 2], [4, 2]]
    assert any("truncated after 1 of 3 rows" in p for p in out.problems)
    assert any("not closed" in p for p in out.problems)
    # no size tokens: the grid is read from the rows
    out = stream.decode([s.boi, c[1], c[2], c[3], s.eor, c[4], c[5], c[6], s.eor, s.eoi])
    assert out.segments[0].codes.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert "grid 2x3 taken from its rows" in out.problems[0]
    # too many rows are cut to the stated grid; an image with no codes is dropped
    out = stream.decode([s.boi, s.size_id(1), s.size_id(1), c[1], s.eor, c[2], s.eor, s.eoi,
                         *stream.text.encode("hi")])
    assert out.segments[0].codes.tolist() == [[1]] and "1 extra rows cut" in out.problems[0]
    assert out.segments[1] == Text("hi")  # the text after the image is read on
    out = stream.decode([s.boi, s.size_id(2), s.size_id(2), s.eoi])
    assert out.segments == [] and "no codes" in out.problems[0]
    # row ends and sizes outside an image are stray
    out = stream.decode([s.eor, s.size_id(3)])
    assert len(out.problems) == 2 and "stray" in out.problems[0]


def test_version_1_spaces_keep_the_square_format(text_tokenizer):
    from anymodal.tokenizers.stream import Stream
    from anymodal.tokenizers.token_space import TokenSpace

    space = TokenSpace.build(text_tokenizer, image_codebook_size=32, image_grid=(4, 4), audio_n_q=3,
                             audio_codebook_size=16, audio_frame_rate=50.0, audio_sample_rate=16000, version=1)
    assert not space.any_aspect and space.image_span() == 18
    stream = Stream(space, text_tokenizer)
    codes = np.arange(16).reshape(4, 4)
    ids, _ = stream.encode([Image(codes)], bos=False, eos=False)
    assert ids.tolist() == [space.boi, *(codes.reshape(-1) + space.image_offset).tolist(), space.eoi]
    assert stream.decode(ids).segments == [Image(codes)]
    with pytest.raises(UserError, match="the grid is"):
        stream.encode([Image(np.zeros((2, 8), dtype=np.int64))])

"""`anymodal sample` and `anymodal ground` end to end on a tiny random bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from anymodal.cli import main
from anymodal.errors import UserError
from anymodal.sample.bundle import load_bundle, save_bundle_layout, tiny_bundle
from anymodal.sample.ground import ground_image, unfit_box
from anymodal.sample.prompt import parse_prompt
from anymodal.sample.render import Part, RenderedSample, write_page
from anymodal.sample.session import SampleOptions, run_sample, sampling_from_flags

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    b = tiny_bundle(max_seq_len=160)
    # Make spans likely in a random model: bias the head towards the openers.
    with torch.no_grad():
        b.model.head.weight[[b.space.boi, b.space.boa, b.space.box]] += 0.6 * b.model.norm.weight
    return save_bundle_layout(b, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "scene.png"
    arr = np.full((40, 60, 3), 255, np.uint8)
    arr[5:20, 10:25] = (220, 40, 40)
    PILImage.fromarray(arr).save(p)
    return p


def test_parse_prompt_inline_and_flag_media():
    parts = parse_prompt("describe <image:a b.png> then <audio:q.wav>!", images=["x.png"])
    assert [(p.kind, p.value) for p in parts] == [
        ("image", "x.png"), ("text", "describe "), ("image", "a b.png"), ("text", " then "), ("audio", "q.wav"),
        ("text", "!")]


def test_sampling_flags_per_modality():
    s = sampling_from_flags("text=0.5,image=0", "7", None)
    assert s.text.temperature == 0.5 and s.image.temperature == 0.0 and s.audio.temperature == 1.0
    assert s.text.top_k == s.loc.top_k == 7
    with pytest.raises(UserError):
        sampling_from_flags("colour=1")
    with pytest.raises(UserError):
        sampling_from_flags("hot")


def test_html_escapes_generated_text(tmp_path):
    evil = RenderedSample(parts=[Part("text", '<script>alert("x")</script> & <img src=x onerror=y>')],
                          tokens=[1], probs=[0.5], finish="eos")
    write_page(tmp_path, "<b>prompt</b>", [Part("text", "<b>prompt</b>")], [evil], [1], {})
    page = (tmp_path / "index.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b>prompt" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    sample = json.loads((tmp_path / "tokens.json").read_text())["samples"][0]
    assert sample["tokens"] == [1] and sample["text"].startswith("<script>alert")


def test_sample_command_writes_every_output(bundle_dir, picture, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--model", str(bundle_dir), "--prompt", f"a small red circle <image:{picture}> and",
               "--out", str(out), "--seed", "3", "--cfg", "2.0", "--max-new-tokens", "60", "--num-samples", "3",
               "--temperature", "1.0"])
    assert rc == 0
    files = {p.name for p in out.iterdir()}
    assert {"index.html", "sample.md", "tokens.json", "prompt_image_0.png"} <= files
    tokens = json.loads((out / "tokens.json").read_text())
    assert len(tokens["samples"]) == 3 and [s["seed"] for s in tokens["samples"]] == [3, 4, 5]
    bundle = load_bundle(bundle_dir)
    n_img = n_aud = 0
    for s in tokens["samples"]:
        dec = bundle.stream.decode(s["tokens"])
        assert not dec.problems
        n_img += sum(type(x).__name__ == "Image" for x in dec.segments)
        n_aud += sum(type(x).__name__ == "Audio" for x in dec.segments)
    gen_images = sorted(f for f in files if f.startswith("image_"))
    gen_audio = sorted(f for f in files if f.startswith("audio_"))
    assert len(gen_images) == n_img and len(gen_audio) == n_aud and n_img + n_aud > 0
    # each PNG is its generated grid (the model's own choice) times the tokenizer's 4 pixels a code
    n = 0
    for i, s in enumerate(tokens["samples"]):
        for seg in bundle.stream.decode(s["tokens"]).segments:
            if type(seg).__name__ == "Image":
                h, w = seg.codes.shape
                assert h * w <= bundle.tok.image.max_tokens
                assert PILImage.open(out / f"image_{i}_{n}.png").size == (w * 4, h * 4)
                n += 1
    page = (out / "index.html").read_text()
    assert all(f in page for f in gen_images + gen_audio)
    # the same seed reproduces the same tokens
    again = run_sample(bundle, f"a small red circle <image:{picture}> and", tmp_path / "again",
                       opts=SampleOptions(seed=3, cfg=2.0, max_new_tokens=60, num_samples=1, temperature="1.0"))
    assert again[0].tokens == tokens["samples"][0]["tokens"]


def test_sample_user_errors(bundle_dir, tmp_path, capsys):
    long_prompt = "a small red circle at the top left " * 40
    assert main(["sample", "--model", str(bundle_dir), "--prompt", long_prompt, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "context is 160 tokens" in err and "prompt is" in err
    assert main(["sample", "--model", str(bundle_dir), "--prompt", "<image:nope.png>", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path)]) == 2


def test_ground_box_inside_image(bundle_dir, picture, tmp_path, capsys):
    drawn = tmp_path / "boxed.png"
    rc = main(["ground", "--model", str(bundle_dir), "--image", str(picture), "--query", "the red square",
               "--out", str(drawn)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    x1, y1, x2, y2 = res["box"]
    assert 0 <= x1 < x2 <= 60 and 0 <= y1 < y2 <= 40
    assert 0 < res["score"] <= 1
    assert PILImage.open(drawn).size == (60, 40)
    assert np.any(np.asarray(PILImage.open(drawn)) != np.asarray(PILImage.open(picture)))
    bundle = load_bundle(bundle_dir)
    assert ground_image(bundle, picture, "the red square") == res  # greedy: deterministic
    with pytest.raises(UserError):
        ground_image(bundle, tmp_path / "nope.png", "x")


def test_unfit_box_inverts_the_fit():
    # resize: normalized -> pixels of each axis
    assert unfit_box((0.25, 0.5, 0.75, 1.0), 80, 40, 16, "resize") == (20.0, 20.0, 60.0, 40.0)
    # letterbox of 80x40 on 16x16: scale 0.2, image 16x8 centred at y offset 4 px (0.25)
    box = unfit_box((0.0, 0.25, 1.0, 0.75), 80, 40, 16, "letterbox")
    assert np.allclose(box, (0.0, 0.0, 80.0, 40.0))
    box = unfit_box((0.5, 0.5, 0.75, 0.625), 80, 40, 16, "letterbox")
    assert np.allclose(box, (40.0, 20.0, 60.0, 30.0))


def test_prompt_ending_inside_an_image_span(bundle_dir, tmp_path):
    """`--prompt "...<boi>"` (as the demo uses it): the output starts with the image's grid (the
    model's choice, here within the 20 tokens asked for), then its rows."""
    bundle = load_bundle(bundle_dir)
    sp = bundle.space
    res = run_sample(bundle, "a large red circle<boi>", tmp_path, opts=SampleOptions(cfg=3.0, max_new_tokens=20))
    toks = res[0].tokens
    h, w = (t - sp.size_range()[0] + 1 for t in toks[:2])
    lo, hi = sp.image_range()
    assert [t == sp.eor for t in toks[2: 2 + h * (w + 1)]] == ([False] * w + [True]) * h
    assert all(lo <= t < hi for t in toks[2: 2 + h * (w + 1)] if t != sp.eor)
    assert toks[2 + h * (w + 1)] == sp.eoi and sp.image_span(h, w) - 1 <= 20
    assert sorted(p.name for p in tmp_path.glob("image_*.png")) == ["image_0_0.png"]
    assert PILImage.open(tmp_path / "image_0_0.png").size == (4 * w, 4 * h)
    # --stop-after-span ends the sample right at <eoi>
    assert main(["sample", "--model", str(bundle_dir), "--prompt", "a large red circle<boi>", "--out",
                 str(tmp_path / "stop"), "--stop-after-span", "--max-new-tokens", "60"]) == 0
    sample = json.loads((tmp_path / "stop" / "tokens.json").read_text())["samples"][0]
    h, w = (t - sp.size_range()[0] + 1 for t in sample["tokens"][:2])
    assert sample["finish"] == "span" and len(sample["tokens"]) == sp.image_span(h, w) - 1


@pytest.fixture(scope="module")
def native_bundle_dir(tmp_path_factory):
    """A tiny bundle with room for larger images: 512 tokens of context; its image tokenizer (4 pixels
    a code) fits images natively, at most 32 codes each."""
    b = tiny_bundle(max_seq_len=512)
    b.tok.image.cfg.model.image_mode = "native"
    b.tok.image.cfg.model.max_tokens = 32
    return save_bundle_layout(b, tmp_path_factory.mktemp("native_bundle"))


def _png_size(out):
    (png,) = out.glob("image_*.png")
    return PILImage.open(png).size


def test_sample_image_size_and_aspect(native_bundle_dir, tmp_path, capsys):
    """--image-size 96x48 draws a 24 x 12-code image: a 96x48 PNG; --aspect 2:1 the 2:1 grid within
    max_tokens (4 x 8 codes: 32x16); a size off the grid snaps to whole codes."""
    sp = load_bundle(native_bundle_dir).space
    common = ["--model", str(native_bundle_dir), "--max-new-tokens", "320", "--stop-after-span", "--cfg", "2"]
    assert main(["sample", "--prompt", "a wide picture", "--image-size", "96x48", "--out", str(tmp_path / "a"),
                 *common]) == 0
    assert _png_size(tmp_path / "a") == (96, 48)
    doc = json.loads((tmp_path / "a" / "tokens.json").read_text())
    assert doc["prompt"][-3:] == [sp.boi, sp.size_id(12), sp.size_id(24)] and doc["image_grid"] == [12, 24]
    tokens = doc["samples"][0]["tokens"]
    assert len(tokens) == 12 * 25 + 1 and tokens[-1] == sp.eoi
    assert main(["sample", "--prompt", "a wide picture", "--aspect", "2:1", "--out", str(tmp_path / "b"),
                 *common]) == 0
    assert _png_size(tmp_path / "b") == (32, 16)
    # the prompt's own <boi> gets the sizes after it; 30x21 px snaps to 8 x 5 codes
    capsys.readouterr()
    assert main(["sample", "--prompt", "a picture<boi>", "--image-size", "30x21", "--out", str(tmp_path / "c"),
                 *common]) == 0
    assert "snapped to 32x20" in capsys.readouterr().err
    assert _png_size(tmp_path / "c") == (32, 20)
    prompt = json.loads((tmp_path / "c" / "tokens.json").read_text())["prompt"]
    assert prompt[-3:] == [sp.boi, sp.size_id(5), sp.size_id(8)] and prompt.count(sp.boi) == 1


def test_image_size_user_errors(native_bundle_dir, tmp_path, capsys):
    def fails(*args) -> str:
        capsys.readouterr()
        assert main(["sample", "--model", str(native_bundle_dir), "--prompt", "x", "--out", str(tmp_path),
                     *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "at most 64 codes (256 pixels)" in fails("--image-size", "300x48")
    assert "expected WxH" in fails("--image-size", "wide")
    assert "expected W:H" in fails("--aspect", "2:0")
    assert "not both" in fails("--image-size", "8x8", "--aspect", "1:1")
    assert "needs 301 new tokens; --max-new-tokens is 100" in fails("--image-size", "96x48", "--max-new-tokens", "100")
    assert "prompt ends inside an audio clip" in fails("--prompt", "x<boa>", "--aspect", "1:1")


def test_version_1_bundles_draw_their_square(tmp_path, capsys):
    """A bundle of a version-1 token space keeps the square format: --image-size must be its square,
    the image is `<boi>` and h*w codes."""
    import dataclasses

    from anymodal.model.transformer import Transformer
    from anymodal.sample.bundle import Bundle
    from anymodal.tokenizers import Stream, Tokenizers, build_space

    t = tiny_bundle().tok
    sp = build_space(t.text, t.image, t.audio, version=1)
    model = Transformer(dataclasses.replace(tiny_bundle().model.cfg, vocab_size=sp.vocab_size)).eval()
    folder = save_bundle_layout(Bundle(model, Tokenizers(t.text, t.image, t.audio, sp, Stream(sp, t.text))),
                                tmp_path / "v1")
    assert load_bundle(folder).space.version == 1
    out = tmp_path / "out"
    assert main(["sample", "--model", str(folder), "--prompt", "a picture", "--image-size", "16x16", "--out",
                 str(out), "--stop-after-span", "--cfg", "1"]) == 0
    tokens = json.loads((out / "tokens.json").read_text())
    assert tokens["prompt"][-1] == sp.boi and len(tokens["samples"][0]["tokens"]) == sp.image_tokens + 1
    assert _png_size(out) == (16, 16)
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--prompt", "a picture", "--aspect", "2:1", "--out",
                 str(out)]) == 2
    assert "square images only, 16x16 pixels" in capsys.readouterr().err


def test_ground_a_non_square_image_natively(native_bundle_dir, picture):
    """A 60x40 input is fitted natively (6 x 4 codes: 24x16 pixels, its own aspect); the box comes back
    in its pixels: the model's normalized box times the input's width and height."""
    from anymodal.sample.ground import _open, ground_codes, ground_prompt, model_image
    from anymodal.sample.prompt import image_codes

    bundle = load_bundle(native_bundle_dir)
    sp = bundle.space
    fitted = model_image(bundle, _open(picture))
    assert fitted.shape == (16, 24, 3)
    codes = image_codes(fitted, bundle.tok.image)[0]
    assert codes.shape == (4, 6)
    ids = ground_prompt(sp, bundle.tok.text, codes, "the red square")
    query = bundle.tok.text.encode("find <ref>the red square</ref>")  # the query first, as ground documents
    assert ids[: 1 + len(query)] == [sp.bos, *query]
    image = ids[1 + len(query):]
    assert image[:3] == [sp.boi, sp.size_id(4), sp.size_id(6)] and image[3 + 4 * 7] == sp.eoi and len(image) == 4 + 4 * 7
    g = ground_codes(bundle, [(codes, "the red square")])[0]
    res = ground_image(bundle, picture, "the red square")
    want = (g.box[0] * 60, g.box[1] * 40, g.box[2] * 60, g.box[3] * 40)
    assert np.allclose(res["box"], want, atol=0.051) and res["score"] == round(g.score, 4)
    x1, y1, x2, y2 = res["box"]
    assert 0 <= x1 < x2 <= 60 and 0 <= y1 < y2 <= 40


@pytest.mark.parametrize("prompt, flags, want", [("a red circle<boi>", [], 1.5), ("say: hello<boa>", [], 3.0),
                                                 ("a red circle<boi>", ["--cfg", "2"], 2.0)])
def test_guidance_defaults_to_the_scale_of_the_span_the_prompt_opens(bundle_dir, tmp_path, prompt, flags, want):
    out = tmp_path / "out"
    assert main(["sample", "--model", str(bundle_dir), "--prompt", prompt, "--out", str(out),
                 "--max-new-tokens", "8", *flags]) == 0
    assert json.loads((out / "tokens.json").read_text())["cfg"] == want

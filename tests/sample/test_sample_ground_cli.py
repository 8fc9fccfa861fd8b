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
    for f in gen_images:
        assert np.asarray(PILImage.open(out / f)).shape == (16, 16, 3)
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
    """`--prompt "...<boi>"` (as the demo uses it): the output starts with the image's codes."""
    bundle = load_bundle(bundle_dir)
    sp = bundle.space
    res = run_sample(bundle, "a large red circle<boi>", tmp_path, opts=SampleOptions(cfg=3.0, max_new_tokens=20))
    toks = res[0].tokens
    assert all(sp.image_offset <= t < sp.image_offset + sp.image_codebook_size for t in toks[: sp.image_tokens])
    assert toks[sp.image_tokens] == sp.eoi
    assert sorted(p.name for p in tmp_path.glob("image_*.png")) == ["image_0_0.png"]
    # --stop-after-span ends the sample right at <eoi>
    assert main(["sample", "--model", str(bundle_dir), "--prompt", "a large red circle<boi>", "--out",
                 str(tmp_path / "stop"), "--stop-after-span", "--max-new-tokens", "60"]) == 0
    sample = json.loads((tmp_path / "stop" / "tokens.json").read_text())["samples"][0]
    assert sample["finish"] == "span" and len(sample["tokens"]) == sp.image_tokens + 1

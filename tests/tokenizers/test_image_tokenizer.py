"""Image tokenizer: shapes, encode/decode consistency, training progress, resume, FSQ/LFQ, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anymodal.cli import main as cli
from anymodal.config import load_config
from anymodal.errors import ConfigError, UserError
from anymodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, read_ids_json
from anymodal.tokenizers.image_losses import ImageLoss, PatchDiscriminator, corner_mask, edge_mask, ssim
from anymodal.train.image_tokenizer import evaluate, train

TINY = {
    "model": {"resolution": 32, "downsample": 8, "patch_size": 4, "channels": [16, 32], "z_channels": 16,
              "dec_res_blocks": 1},
    "quantizer": {"codebook_size": 64, "codebook_dim": 4},
    "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "log_every": 1, "val_every": 1000,
              "val_images": 48, "ckpt_every": 1000, "threads": 0, "seed": 0},
}


def tiny_cfg(**sections) -> ImageTokenizerConfig:
    data = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return load_config(ImageTokenizerConfig, data=data)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from anymodal.data.world import generate_world

    root = tmp_path_factory.mktemp("imgworld")
    generate_world(root / "train", split="train", docs=150, seed=1, audio=False, progress=False)
    generate_world(root / "val", split="val", docs=40, seed=1, audio=False, progress=False)
    return {"train_shards": [str(root / "train" / "*.tar")], "val_shards": [str(root / "val" / "*.tar")]}


def assert_resume_repeats_losses(cfg, run, last: int, resumed: list[int]) -> None:
    """Drop the last checkpoint and the log of a finished run, resume it, and check the resumed steps'
    losses equal the uninterrupted run's (exact resume)."""
    log = run / "train_log.jsonl"
    full = {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r}
    (run / "checkpoints" / f"step_{last:08d}.pt").unlink()
    log.unlink()
    train(cfg, run, resume=True, progress=False)
    again = {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r}
    assert sorted(again) == resumed
    for s in again:
        assert again[s] == pytest.approx(full[s], rel=1e-5, abs=1e-7), (s, again[s], full[s])


def test_shapes_dtypes_and_decode_of_encode_equals_forward():
    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg())
    x = torch.rand(3, 3, 32, 32)
    tok(x * 2 - 1)  # training-mode forward: k-means initialises the codebook
    ids = tok.encode(x)
    assert ids.dtype == torch.long and ids.shape == (3, 4, 4) and tok.grid_shape == (4, 4)
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.codebook_size == 64
    img = tok.decode(ids)
    assert img.dtype == torch.float32 and img.shape == (3, 3, 32, 32)
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    tok.eval()
    with torch.no_grad():
        rec, ids2, _ = tok(x * 2 - 1)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(img, ((rec + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(UserError):
        tok.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(UserError):
        tok.decode(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(UserError):
        tok.decode(torch.zeros(1, 0, 4, dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg())
    x = torch.rand(2, 3, 32, 32)
    tok(x * 2 - 1)
    tok.save(tmp_path)
    back = ImageTokenizer.load(tmp_path)
    assert torch.equal(back.encode(x), tok.encode(x))
    torch.testing.assert_close(back.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_losses_ssim_gan_perceptual():
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-5)
    assert float(ssim(a, torch.rand_like(a) * 2 - 1).mean()) < 0.2
    assert float(ssim(a, (a + 0.2 * torch.randn_like(a)).clamp(-1, 1)).mean()) < 0.99
    assert PatchDiscriminator(16, 2)(a).shape == (2, 1, 8, 8)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())  # random stand-in
    cfg = tiny_cfg(loss={"ssim_weight": 0.5, "edge_weight": 1.0, "perceptual_weight": 0.1, "gan_weight": 0.1, "gan_start_step": 0,
                         "disc_channels": 16, "disc_layers": 2}).loss
    loss_fn = ImageLoss(cfg, perceptual_net=lambda x: [net(x)])
    rec = (a + 0.3 * torch.randn_like(a)).requires_grad_(True)
    last = torch.nn.Parameter(torch.ones(()))
    loss, parts = loss_fn.generator_loss(a, rec * last, torch.zeros(()), step=0, last_layer=last)
    assert {"l1", "l2", "edge_l1", "ssim", "perceptual", "gan_g", "gan_w"} <= parts.keys()
    assert parts["perceptual"] > 0 and np.isfinite(parts["loss"])
    loss.backward()
    assert rec.grad is not None and float(rec.grad.abs().sum()) > 0
    _, same = loss_fn.generator_loss(a, a.clone(), torch.zeros(()), step=0)
    assert same["perceptual"] < 1e-6 and same["l1"] == 0
    d = loss_fn.discriminator_loss(a, rec)
    d.backward()
    assert all(p.grad is not None for p in loss_fn.disc.parameters())


def test_edge_and_corner_masks_and_corner_loss():
    img = -torch.ones(1, 3, 32, 32)  # white-ish background in [-1, 1]
    img[:, :, 8:20, 8:20] = 0.5  # a 12 px square
    edge = edge_mask(img)[0, 0]
    ref = F.max_pool2d(img, 3, 1, 1) + F.max_pool2d(-img, 3, 1, 1)  # the plain 3x3 definition
    assert torch.equal(edge, (ref.amax(1)[0] > 0.1).float())
    assert edge[7:9, 12].tolist() == [1.0, 1.0] and edge[12, 12] == 0 and edge[3, 3] == 0
    corner = corner_mask(img, window=5)[0, 0]
    # every corner is marked (both sides of it), the middle of each straight side and the inside are not
    for y, x in [(7, 7), (8, 8), (19, 19), (20, 20), (8, 19), (19, 8)]:
        assert corner[y, x] == 1, (y, x)
    for y, x in [(8, 14), (19, 14), (14, 8), (14, 19), (14, 14), (2, 2)]:
        assert corner[y, x] == 0, (y, x)
    assert float(corner_mask(img, window=3).sum()) < float(corner.sum())
    # the loss term: off by default (old configs train as before), on when weighted
    rec = img.clone()
    rec[:, :, 8:10, 8:10] = -1  # round one corner off
    plain = ImageLoss(tiny_cfg().loss)
    _, p0 = plain.generator_loss(img, rec, torch.zeros(()), step=0)
    assert "corner_l1" not in p0
    with_c = ImageLoss(tiny_cfg(loss={"corner_weight": 2.0}).loss)
    loss, p1 = with_c.generator_loss(img, rec, torch.zeros(()), step=0)
    assert p1["corner_l1"] > 0 and p1["loss"] == pytest.approx(p0["loss"] + 2.0 * p1["corner_l1"], rel=1e-5)
    rec2 = img.clone()
    rec2[:, :, 13:15, 13:15] = -1  # the same error in the middle of the square
    _, p2 = with_c.generator_loss(img, rec2, torch.zeros(()), step=0)
    assert p2["corner_l1"] == 0 and p2["l1"] == pytest.approx(p1["l1"])
    with pytest.raises(UserError):
        tiny_cfg(loss={"corner_window": 4})


def test_training_raises_psnr_and_resume_matches(world, tmp_path):
    from anymodal.train.image_tokenizer import _load_images

    cfg = tiny_cfg(data={**world}, train={"steps": 240, "ckpt_every": 120})
    torch.manual_seed(0)
    untrained, _ = evaluate(ImageTokenizer(cfg), _load_images(world["val_shards"], cfg, 48, None))
    res = train(cfg, tmp_path / "a", progress=False)
    # an untrained tokenizer scores ~10 dB on these scenes; 240 tiny steps reach ~18
    assert res["final"]["psnr"] > max(16.0, untrained["psnr"] + 5), (untrained, res["final"])
    assert res["final"]["codebook_usage"] > 0.3
    assert res["final"]["step"] == 240 and res["steps"] == 240
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / "config.yaml").is_file()
    assert any((tmp_path / "a" / "val").glob("*.png"))

    # resume from the step-120 checkpoint: the next losses equal the uninterrupted run's
    cfg_b = tiny_cfg(data={**world}, train={"steps": 124, "ckpt_every": 120})
    run = tmp_path / "b"
    train(cfg_b, run, progress=False)
    assert_resume_repeats_losses(cfg_b, run, last=124, resumed=[121, 122, 123, 124])


@pytest.mark.parametrize("kind,extra", [("fsq", {"fsq_levels": [4, 4, 4]}), ("lfq", {"codebook_size": 64})])
def test_fsq_and_lfq_options_train_and_round_trip(world, tmp_path, kind, extra):
    cfg = tiny_cfg(quantizer={"kind": kind, **extra}, data={**world}, train={"steps": 20, "val_images": 16})
    res = train(cfg, tmp_path, progress=False)
    assert np.isfinite(res["final"]["psnr"])
    tok = ImageTokenizer.load(tmp_path)
    assert tok.codebook_size == 64
    x = torch.rand(2, 3, 32, 32)
    ids = tok.encode(x)
    assert ids.shape == (2, 4, 4) and int(ids.max()) < 64
    with torch.no_grad():
        rec, _, _ = tok(x * 2 - 1)
    torch.testing.assert_close(tok.decode(ids), ((rec + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


def test_cli_round_trip_and_bad_input(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg())
    tok(torch.rand(4, 3, 32, 32) * 2 - 1)
    tok.save(tmp_path / "tok")
    # a palette-mode image of another size: converted and resized by load_image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).convert("P").save(
        tmp_path / "in.png")
    assert cli(["tokenizer", "encode", "image", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "in.png"),
                str(tmp_path / "ids.json")]) == 0
    doc = json.loads((tmp_path / "ids.json").read_text())
    assert np.asarray(doc["ids"]).shape == (4, 4)
    assert cli(["tokenizer", "decode", "image", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "ids.json"),
                str(tmp_path / "out.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    expect = (tok.decode(torch.tensor(doc["ids"])[None])[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(out.astype(float) - expect).max() <= 1

    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "big.json").write_text(json.dumps({"ids": [[64] * 4] * 4}))
    (tmp_path / "shape.json").write_text(json.dumps({"ids": [[0] * 5, [0] * 4]}))  # ragged rows
    (tmp_path / "junk.json").write_text("{{")
    bad = [
        ("encode", "bad.png"), ("encode", "missing.png"),
        ("decode", "big.json"), ("decode", "shape.json"), ("decode", "junk.json"), ("decode", "in.png"),
    ]
    for action, name in bad:
        capsys.readouterr()
        rc = cli(["tokenizer", action, "image", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / name),
                  str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2, (action, name)
        assert err.startswith("anymodal: error:") and err.count("\n") == 1, err
    assert cli(["tokenizer", "decode", "image", "--tokenizer", str(tmp_path / "nope"), str(tmp_path / "ids.json"),
                str(tmp_path / "o.png")]) == 2
    with pytest.raises(UserError):
        read_ids_json(tmp_path / "shape.json", (4, 4), 64)


def test_evaluate_reports_metrics():
    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg())
    tok(torch.rand(4, 3, 32, 32) * 2 - 1)
    imgs = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    m, rec = evaluate(tok, imgs, batch=4, image_check=True)
    assert rec.shape == imgs.shape and rec.dtype == torch.uint8
    assert 0 < m["codebook_usage"] <= 1 and 1 <= m["perplexity"] <= 64 and np.isfinite(m["psnr"])
    assert 0 <= m["image_check_agreement"] <= 1


def test_two_process_gloo_training(world, tmp_path):
    """torchrun with 2 CPU processes: DDP + synced codebook; rank 0 writes the tokenizer."""
    import os
    import subprocess
    import sys

    cfg_path = tmp_path / "tiny.yaml"
    import yaml

    data = json.loads(json.dumps(TINY))
    data["data"] = dict(world)
    data["train"].update({"steps": 12, "val_images": 16, "ckpt_every": 6, "threads": 1, "device": "cpu"})
    cfg_path.write_text(yaml.safe_dump(data))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "anymodal.cli", "tokenizer", "train",
           "image", "--config", str(cfg_path), "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 12
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == [
        "step_00000006.pt", "step_00000012.pt"]
    tok = ImageTokenizer.load(tmp_path / "run")
    assert tok.encode(torch.rand(1, 3, 32, 32)).shape == (1, 4, 4)

def test_refine_starts_as_the_plain_decoder_then_learns(tmp_path):
    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg(model={"refine_channels": 4, "refine_hidden": 8}))
    dec = tok.decoder
    assert dec.net[-1].__class__.__name__ == "PixelShuffle"
    z = torch.randn(2, 16, 4, 4)
    y = dec.net(z)  # [B, 3 + 4, 32, 32]: RGB plus the feature maps carried to full resolution
    assert y.shape == (2, 7, 32, 32)
    torch.testing.assert_close(dec(z), y[:, :3])  # zero-initialised residual: exactly the RGB part

    # one optimiser step moves the residual off zero and changes the output per pixel
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.SGD(tok.parameters(), lr=0.1)
    rec, _, aux = tok(x)
    ((rec - x).abs().mean() + aux).backward()
    assert dec.refine[-1].weight.grad is not None and float(dec.refine[-1].weight.grad.abs().sum()) > 0
    opt.step()
    assert float((dec(z) - dec.net(z)[:, :3]).abs().max()) > 0

    # save/load keeps the stage, and decode(encode(x)) is the eval forward
    tok.eval()
    tok.save(tmp_path)
    back = ImageTokenizer.load(tmp_path)
    img = (x + 1) / 2
    ids = tok.encode(img)
    assert torch.equal(back.encode(img), ids)
    with torch.no_grad():
        rec, ids2, _ = tok(x)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(back.decode(ids), ((rec + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


def test_refine_off_adds_no_weights_and_bad_values_are_refused():
    plain = ImageTokenizer(tiny_cfg())
    assert plain.decoder.refine is None
    assert not any("refine" in k for k in plain.state_dict())
    with pytest.raises(ConfigError):
        tiny_cfg(model={"refine_channels": -1})


def test_fsq_batch_entropy_matches_hard_codes_and_spreads_them():
    from vector_quantize_pytorch import FSQ

    from anymodal.tokenizers.image import fsq_code_entropies

    def fsq_batch_entropy(fsq, z, temperature):
        return fsq_code_entropies(fsq, z, temperature)[0]

    torch.manual_seed(0)
    fsq = FSQ(levels=[4, 4, 3], dim=6, channel_first=True)
    z = torch.randn(8, 6, 4, 4) * 2
    _, ids = fsq(z)
    counts = torch.bincount(ids.flatten(), minlength=48).float()
    p = counts[counts > 0] / counts.sum()
    hard = float(-(p * p.log()).sum() / np.log(48))
    # a cold soft assignment is the hard code histogram; a warm one is more spread
    assert abs(float(fsq_batch_entropy(fsq, z, 1e-3)) - hard) < 1e-3
    assert float(fsq_batch_entropy(fsq, z, 1.0)) > hard
    # the large-codebook fallback (per-dimension marginals) stays a normalised entropy
    # (32,768 codes x 2,048 latents is past the joint table's budget; FSQ itself keeps an implicit
    # codebook of every code, so far larger level sets cannot be built in a test)
    big = FSQ(levels=[8, 8, 8, 8, 8], dim=5, channel_first=True)
    e = float(fsq_batch_entropy(big, torch.randn(8, 5, 16, 16), 0.5))
    assert 0 < e <= 1

    # collapsed latents: maximising the term alone spreads them over more codes
    z = (torch.randn(4, 6, 4, 4) * 0.01).requires_grad_()
    used_before = fsq(z)[1].unique().numel()
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(60):
        loss = 1 - fsq_batch_entropy(fsq, z, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fsq(z)[1].unique().numel() >= used_before + 10


def test_fsq_per_latent_entropy_is_low_on_levels_and_pulls_latents_onto_them():
    from vector_quantize_pytorch import FSQ

    from anymodal.tokenizers.image import fsq_code_entropies

    torch.manual_seed(0)
    fsq = FSQ(levels=[4, 4, 3], dim=3, channel_first=True)  # dim == len(levels): project_in is identity
    z = torch.randn(4, 3, 4, 4)
    batch, per_latent = fsq_code_entropies(fsq, z, 1e-3)
    assert float(per_latent) < 0.01 < float(batch)  # cold: (nearly) every latent is one code
    warm_b, warm_l = fsq_code_entropies(fsq, z, 1.0)
    assert 0 < float(warm_l) <= float(warm_b) <= 1 + 1e-6  # a mean's entropy bounds its parts'
    # by hand for one latent and one dimension: softmax(-(pos - level)^2 / T) over the levels
    one = torch.zeros(1, 3, 1, 1)
    _, h1 = fsq_code_entropies(fsq, one, 1.0)
    levels = fsq._levels.tolist()
    half = [(n - 1) * (1 + 1e-3) / 2 for n in levels]
    off = [0.5 if n % 2 == 0 else 0.0 for n in levels]
    total = 0.0
    for n, hl, o in zip(levels, half, off):
        pos = np.tanh(np.arctanh(o / hl)) * hl - o + n // 2
        w = np.exp(-((pos - np.arange(n)) ** 2))
        p = w / w.sum()
        total += float(-(p * np.log(p)).sum())
    assert abs(float(h1) - total / np.log(48)) < 1e-5

    # minimising it moves latents from between levels onto them (the rounding error shrinks)
    z = torch.randn(4, 3, 4, 4).requires_grad_()

    lv = fsq._levels.float()
    hl = (lv - 1) * (1 + 1e-3) / 2
    off = torch.where(fsq._levels % 2 == 0, 0.5, 0.0)

    def off_level() -> float:  # mean distance of the bounded latents (FSQ's, before rounding) to a level
        b = torch.tanh(z.detach().permute(0, 2, 3, 1) + torch.atanh(off / hl)) * hl - off
        return float((b - b.round()).abs().mean())

    opt = torch.optim.Adam([z], lr=0.05)
    _, before = fsq_code_entropies(fsq, z, 0.5)
    off_before = off_level()
    for _ in range(80):
        loss = fsq_code_entropies(fsq, z, 0.5)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(fsq_code_entropies(fsq, z, 0.5)[1]) < 0.8 * float(before)
    assert off_level() < 0.5 * off_before


def test_fsq_entropy_weight_enters_the_training_loss_only():
    torch.manual_seed(0)
    cfg = tiny_cfg(quantizer={"kind": "fsq", "fsq_levels": [4, 4, 4], "fsq_entropy_weight": 0.5})
    tok = ImageTokenizer(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, _, aux = tok(x)
    assert 0 < float(aux) <= 0.5 and aux.requires_grad
    both = ImageTokenizer(tiny_cfg(quantizer={"kind": "fsq", "fsq_levels": [4, 4, 4], "fsq_entropy_weight": 0.5,
                                              "fsq_sample_entropy_weight": 0.25}))
    both.load_state_dict(tok.state_dict())
    assert float(both(x)[2]) > float(aux)  # the per-latent term adds on top
    tok.eval()
    with torch.no_grad():
        assert float(tok(x)[2]) == 0.0
    with pytest.raises(ConfigError):
        tiny_cfg(quantizer={"kind": "fsq", "fsq_entropy_temp": 0.0})
    with pytest.raises(ConfigError):
        tiny_cfg(quantizer={"kind": "fsq", "fsq_sample_entropy_weight": -1.0})


def test_fsq_entropy_weight_follows_the_training_progress_when_scheduled():
    torch.manual_seed(0)
    q = {"kind": "fsq", "fsq_levels": [4, 4, 4], "fsq_entropy_weight": 0.4, "fsq_entropy_weight_end": 0.1}
    tok = ImageTokenizer(tiny_cfg(quantizer=q))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    const = ImageTokenizer(tiny_cfg(quantizer={**q, "fsq_entropy_weight_end": -1.0}))
    const.load_state_dict(tok.state_dict())
    gap = float(const(x)[2]) / 0.4  # the spreading term itself, 1 - H(batch)
    for p, w in ((0.0, 0.4), (0.5, 0.25), (1.0, 0.1), (3.0, 0.1)):
        tok.train_progress = p
        assert tok.fsq_entropy_weight_now() == pytest.approx(w)
        assert float(tok(x)[2]) == pytest.approx(w * gap, rel=1e-5)
    const.train_progress = 1.0
    assert const.fsq_entropy_weight_now() == 0.4


def test_generated_world_sizes_follow_world_and_val_docs(tmp_path):
    from anymodal.train.image_tokenizer import _world_shards

    cfg = tiny_cfg(data={"world_docs": 12, "val_docs": 7})
    train_glob, val_glob = _world_shards(tmp_path, cfg, rank=0)
    assert train_glob.endswith("train/*.tar") and val_glob.endswith("val/*.tar")
    assert json.loads((tmp_path / "world" / "train" / "train.json").read_text())["docs"] == 12
    assert json.loads((tmp_path / "world" / "val" / "val.json").read_text())["docs"] == 7
    # val_docs 0: a fifth of world_docs, at least 64
    cfg = tiny_cfg(data={"world_docs": 12})
    _world_shards(tmp_path / "b", cfg, rank=0)
    assert json.loads((tmp_path / "b" / "world" / "val" / "val.json").read_text())["docs"] == 64


# ---------------------------------------------------------------------------------------- any aspect


@pytest.mark.parametrize("attention", [False, True])
def test_any_grid_round_trip_at_three_aspects(attention):
    """The nets are convolutional (the attention block has no positions): any H, W that are
    multiples of the factor encode to [H/f, W/f] and decode back to H x W, consistently."""
    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg(model={"attention": attention}))
    tok(torch.rand(4, 3, 32, 32) * 2 - 1)  # k-means initialises the codebook
    tok.eval()
    for h, w in ((48, 48), (48, 64), (64, 48), (32, 64)):
        x = torch.rand(2, 3, h, w)
        ids = tok.encode(x)
        assert ids.shape == (2, h // 8, w // 8)
        img = tok.decode(ids)
        assert img.shape == (2, 3, h, w) and 0 <= float(img.min()) and float(img.max()) <= 1
        with torch.no_grad():
            rec, ids2, _ = tok(x * 2 - 1)
        assert torch.equal(ids, ids2)
        torch.testing.assert_close(img, ((rec + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
        # a fixed model is a fixed function: re-encoding its own decode gives the same codes each time
        again = tok.encode(img)
        assert torch.equal(again, tok.encode(tok.decode(ids))) and again.shape == ids.shape
        # the batch does not leak between images: one image alone gives its own codes
        assert torch.equal(tok.encode(x[1:]), ids[1:])
    for bad in (torch.rand(1, 3, 50, 64), torch.rand(1, 3, 4, 8), torch.rand(3, 32, 32), torch.rand(1, 1, 32, 32)):
        with pytest.raises(UserError, match="multiples of 8"):
            tok.encode(bad)


def test_encode_pixels_groups_sizes_and_keeps_order():
    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg())
    tok(torch.rand(4, 3, 32, 32) * 2 - 1)
    rng = np.random.default_rng(0)
    sizes = [(24, 32), (32, 32), (24, 32), (32, 24), (24, 32)]
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    codes = tok.encode_pixels(imgs, batch=2)
    assert [c.shape for c in codes] == [(h // 8, w // 8) for h, w in sizes]
    for arr, c in zip(imgs, codes):
        alone = tok.encode(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        assert c.dtype == np.int64 and np.array_equal(c, alone)


def test_native_fit_uses_the_tokenizer_budget():
    from PIL import Image

    from anymodal.data.media import native_grid

    tok = ImageTokenizer(tiny_cfg(model={"image_mode": "native", "max_tokens": 32}))
    assert tok.max_tokens == 32 and ImageTokenizer(tiny_cfg()).max_tokens == 16  # 0: the square grid's area
    img = Image.new("RGB", (100, 60), "white")
    arr, fit = tok.fit(img)
    rows, cols = native_grid(100, 60, 32)
    assert arr.shape == (rows * 8, cols * 8, 3) and rows * cols <= 32
    assert fit.box(20, 10, 60, 30) == (0.2, 10 / 60, 0.6, 0.5)  # each axis relative to its own side
    assert tok.fit(img, "resize")[0].shape == (32, 32, 3)
    assert tok.fit(img, max_tokens=8)[0].shape[:2] == tuple(8 * n for n in native_grid(100, 60, 8))
    args = tok.cfg.model.reader_args()
    assert args == {"image_size": 32, "image_mode": "native", "image_factor": 8, "max_image_tokens": 32}


def test_cli_max_tokens_keeps_the_aspect_and_decode_writes_that_size(tmp_path, capsys):
    from PIL import Image

    from anymodal.data.media import native_grid

    torch.manual_seed(0)
    tok = ImageTokenizer(tiny_cfg())  # resize mode, 32 px, 16 codes
    tok(torch.rand(4, 3, 32, 32) * 2 - 1)
    tok.save(tmp_path / "tok")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(tmp_path / "wide.png")

    def run(*args) -> int:
        return cli(["tokenizer", *map(str, args)])

    assert run("encode", "image", "--tokenizer", tmp_path / "tok", tmp_path / "wide.png", tmp_path / "w.json",
               "--max-tokens", 32) == 0
    doc = json.loads((tmp_path / "w.json").read_text())
    assert doc["grid"] == [4, 8] and np.asarray(doc["ids"]).shape == (4, 8)  # 2:1, 32 codes
    assert run("decode", "image", "--tokenizer", tmp_path / "tok", tmp_path / "w.json", tmp_path / "w.png") == 0
    out = np.asarray(Image.open(tmp_path / "w.png"))
    assert out.shape == (32, 64, 3)
    expect = (tok.decode(torch.tensor(doc["ids"])[None])[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(out.astype(float) - expect).max() <= 1
    # the decoded PNG re-encodes at its own size, to the same grid
    assert run("encode", "image", "--tokenizer", tmp_path / "tok", tmp_path / "w.png", tmp_path / "w2.json",
               "--max-tokens", 32) == 0
    assert json.loads((tmp_path / "w2.json").read_text())["grid"] == [4, 8]

    # without --max-tokens a resize tokenizer squares the image; a native one keeps the aspect in its budget
    assert run("encode", "image", "--tokenizer", tmp_path / "tok", tmp_path / "wide.png", tmp_path / "sq.json") == 0
    assert json.loads((tmp_path / "sq.json").read_text())["grid"] == [4, 4]
    native = ImageTokenizer(tiny_cfg(model={"image_mode": "native"}))
    native.load_state_dict(tok.state_dict())
    native.save(tmp_path / "ntok")
    assert run("encode", "image", "--tokenizer", tmp_path / "ntok", tmp_path / "wide.png", tmp_path / "n.json") == 0
    assert json.loads((tmp_path / "n.json").read_text())["grid"] == list(native_grid(80, 40, 16))

    # a hand-written grid of any shape decodes at its size; bad grids are one-line errors
    (tmp_path / "tall.json").write_text(json.dumps({"ids": [[1, 2]] * 5}))
    assert run("decode", "image", "--tokenizer", tmp_path / "tok", tmp_path / "tall.json", tmp_path / "t.png") == 0
    assert np.asarray(Image.open(tmp_path / "t.png")).shape == (40, 16, 3)
    bad = {"flat.json": {"grid": [2, 3], "ids": list(range(6))},  # fine: a flat list with its grid
           "mismatch.json": {"grid": [3, 2], "ids": [[0, 1, 2]] * 2},
           "badgrid.json": {"grid": [0, 2], "ids": [[0, 1]]},
           "wide.json": {"ids": [[0] * 65]},
           "range.json": {"grid": [1, 2], "ids": [[0, 64]]}}
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
        capsys.readouterr()
        rc = run("decode", "image", "--tokenizer", tmp_path / "tok", tmp_path / name, tmp_path / "o.png")
        err = capsys.readouterr().err
        if name == "flat.json":
            assert rc == 0 and np.asarray(Image.open(tmp_path / "o.png")).shape == (16, 24, 3)
        else:
            assert rc == 2 and err.startswith("anymodal: error:") and err.count("\n") == 1, (name, err)
    for extra in (["--max-tokens", "0"],):
        assert run("encode", "image", "--tokenizer", tmp_path / "tok", tmp_path / "wide.png", tmp_path / "x.json",
                   *extra) == 2
    assert run("encode", "text", "--tokenizer", tmp_path / "tok", tmp_path / "wide.png", tmp_path / "x.json",
               "--max-tokens", "8") == 2
    assert "--max-tokens is for images" in capsys.readouterr().err


def _mixed_shard(path: Path, sizes, n_each: int, seed: int = 0) -> str:
    """A raw shard of one-image documents at the given (w, h) sizes: white scenes with a coloured
    rectangle, so a tiny tokenizer has something to learn at every aspect."""
    import io
    import tarfile

    from anymodal.data.media import encode_png

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n_each * len(sizes)):
            w, h = sizes[i % len(sizes)]
            a = np.full((h, w, 3), 255, np.uint8)
            x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            a[y:y + h // 3, x:x + w // 3] = rng.integers(0, 200, 3)
            for name, data in ((f"d{i:04d}.json", json.dumps({"segments": [{"image": "0.png"}, {"text": "x"}],
                                                               "kind": "i2t"}).encode()),
                               (f"d{i:04d}.0.png", encode_png(a))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


MIXED = [(64, 48), (48, 64), (64, 64)]  # 4:3, 3:4, 1:1 -> native grids 3x4, 4x3, 4x4 within 16 codes


def test_memory_batches_are_one_size_each_deterministic_and_cover_every_size():
    from anymodal.train.image_tokenizer import MemoryBatches

    # one size: exactly the permutation cut into batches, as before buckets existed
    single = torch.arange(10 * 2 * 2 * 3, dtype=torch.float32).reshape(10, 2, 2, 3)
    mb = MemoryBatches(single, 4, seed=3, rank=1)
    assert mb.per_epoch == 2
    for step in range(5):
        epoch, i = divmod(step, 2)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 7919 + epoch))
        assert torch.equal(mb.get(step), single[perm[i * 4:(i + 1) * 4]])
    # three sizes (one smaller than a batch): every batch is one size, all sizes come up, and the
    # batch of a step depends on (seed, rank, step) only
    buckets = [torch.full((9, 3, 4, 3), 0), torch.full((7, 4, 3, 3), 1), torch.full((2, 4, 4, 3), 2)]
    mb = MemoryBatches(buckets, 4, seed=0, rank=0)
    assert mb.per_epoch == 9 // 4 + 7 // 4 + 1
    seen = {}
    for step in range(3 * mb.per_epoch):
        b = mb.get(step)
        assert b.unique().numel() == 1
        seen[int(b[0, 0, 0, 0])] = tuple(b.shape)
        assert torch.equal(b, MemoryBatches(buckets, 4, seed=0, rank=0).get(step))
    assert seen == {0: (4, 3, 4, 3), 1: (4, 4, 3, 3), 2: (2, 4, 4, 3)}
    other = MemoryBatches(buckets, 4, seed=0, rank=1)
    assert any(not torch.equal(other.get(s), mb.get(s)) for s in range(mb.per_epoch))  # ranks differ


def test_native_training_on_mixed_aspects_and_resume(tmp_path):
    from PIL import Image as PILImage

    from anymodal.train.image_tokenizer import StreamBatches, _load_images

    train_shard = _mixed_shard(tmp_path / "train.tar", MIXED, 16)
    val_shard = _mixed_shard(tmp_path / "val.tar", MIXED, 3, seed=1)
    data = {"train_shards": [train_shard], "val_shards": [val_shard]}
    cfg = tiny_cfg(model={"image_mode": "native"}, data=data,
                   train={"steps": 8, "ckpt_every": 4, "batch_size": 8, "val_images": 9, "val_every": 4})
    images = _load_images([train_shard], cfg, 0, None)
    assert sorted(tuple(b.shape) for b in images) == [(16, 24, 32, 3), (16, 32, 24, 3), (16, 32, 32, 3)]
    resized = _load_images([train_shard], tiny_cfg(data=data), 0, None)  # resize mode: one square tensor
    assert isinstance(resized, torch.Tensor) and resized.shape == (48, 32, 32, 3)

    run = tmp_path / "run"
    res = train(cfg, run, progress=False)
    assert res["steps"] == 8 and np.isfinite(res["final"]["psnr"]) and res["final"]["n_images"] == 9
    grid = np.asarray(PILImage.open(run / "val" / "step_00000008.png"))
    assert grid.shape == (64, 8 * 32, 3)  # tiles of every size on cells of the largest
    tok = ImageTokenizer.load(run)
    assert tok.encode(torch.rand(1, 3, 24, 32)).shape == (1, 3, 4)
    assert_resume_repeats_losses(cfg, run, last=8, resumed=[5, 6, 7, 8])

    # streamed: batches of one size each, every size in turn
    stream_cfg = tiny_cfg(model={"image_mode": "native"}, data={**data, "in_memory": False, "shuffle_buffer": 8},
                          train={"batch_size": 4})
    sb = StreamBatches([train_shard], stream_cfg, 0, 1, None)
    shapes = {tuple(sb.get(step).shape) for step in range(12)}
    assert shapes == {(4, 24, 32, 3), (4, 32, 24, 3), (4, 32, 32, 3)}


def test_local_encoder_codes_depend_on_their_own_cell_only(world, tmp_path):
    """`model.encoder: local`: changing the pixels of other cells leaves a cell's code alone, the
    same cell content gives the same code anywhere in the image (the conv encoder does neither),
    and it trains: PSNR rises above the untrained tokenizer's."""
    from anymodal.train.image_tokenizer import _load_images

    cfg = tiny_cfg(model={"encoder": "local"}, quantizer={"kind": "fsq", "fsq_levels": [4, 4, 4]})
    tok = ImageTokenizer(cfg).eval()
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    ids = tok.encode(x)  # [3, 4, 4]
    y = x.clone()
    y[:, :, 8:, :] = torch.rand(3, 3, 24, 32)  # every cell outside the top row changes
    y[:, :, :8, 16:24] = x[:, :, :8, :8]  # the top-left cell's content, copied two cells right
    ids_y = tok.encode(y)
    assert torch.equal(ids_y[:, 0, :2], ids[:, 0, :2]) and torch.equal(ids_y[:, 0, 3], ids[:, 0, 3])
    assert torch.equal(ids_y[:, 0, 2], ids[:, 0, 0])
    conv = ImageTokenizer(tiny_cfg(quantizer={"kind": "fsq", "fsq_levels": [4, 4, 4]})).eval()
    assert not torch.equal(conv.encode(y)[:, 0, :2], conv.encode(x)[:, 0, :2])  # its codes see the neighbours

    cfg = tiny_cfg(model={"encoder": "local"}, quantizer={"kind": "fsq", "fsq_levels": [4, 4, 4]},
                   data={**world}, train={"steps": 120, "val_images": 48})
    torch.manual_seed(0)
    untrained, _ = evaluate(ImageTokenizer(cfg), _load_images(world["val_shards"], cfg, 48, None))
    res = train(cfg, tmp_path / "local", progress=False)
    assert res["final"]["psnr"] > untrained["psnr"] + 4, (untrained, res["final"])
    assert ImageTokenizer.load(tmp_path / "local").cfg.model.encoder == "local"
    with pytest.raises(ConfigError, match="encoder"):
        tiny_cfg(model={"encoder": "global"})


def _colour_structure_cfg(**sections) -> ImageTokenizerConfig:
    base = {"model": {"encoder": "local"}, "quantizer": {"kind": "fsq", "colour_levels": [4, 4], "fsq_levels": [4, 4]}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return tiny_cfg(**base)


def test_colour_structure_codes_pair_two_fsqs_and_round_trip(tmp_path):
    tok = ImageTokenizer(_colour_structure_cfg()).eval()
    assert tok.codebook_size == 256 and tok.code_factors == [16, 16]
    assert ImageTokenizer(tiny_cfg(quantizer={"kind": "fsq", "fsq_levels": [4, 4, 4]})).code_factors == [64]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    ids = tok.encode(x)  # [2, 4, 4]
    z = tok.encoder(x * 2 - 1)
    _, colour = tok.quantizer.colour(z[:, :tok.quantizer.half])
    _, structure = tok.quantizer.structure(z[:, tok.quantizer.half:])
    assert torch.equal(ids, colour + 16 * structure)
    with torch.no_grad():
        rec, _, _ = tok(x * 2 - 1)
    torch.testing.assert_close(tok.decode(ids), ((rec + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    tok.save(tmp_path / "cs")
    back = ImageTokenizer.load(tmp_path / "cs")
    assert back.code_factors == [16, 16] and torch.equal(back.encode(x), ids)


def test_the_colour_code_sees_which_colours_a_cell_holds_not_where():
    tok = ImageTokenizer(_colour_structure_cfg()).eval()
    torch.manual_seed(0)
    x = torch.ones(1, 3, 32, 32)
    x[0, :, 2:7, 1:6] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]  # a red blob in cell (0, 0)
    y = torch.ones(1, 3, 32, 32)
    y[0, :, 0:3, 4:8] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]  # another red shape there
    with torch.no_grad():
        colour_x = tok.encoder.colour(x * 2 - 1)[0, :, 0, 0]
        colour_y = tok.encoder.colour(y * 2 - 1)[0, :, 0, 0]
        structure_x = tok.encoder.structure(x * 2 - 1)[0, :, 0, 0]
        structure_y = tok.encoder.structure(y * 2 - 1)[0, :, 0, 0]
    torch.testing.assert_close(colour_x, colour_y)  # the same set of pixel colours
    assert not torch.allclose(structure_x, structure_y)
    with pytest.raises(ConfigError, match="colour_levels"):
        tiny_cfg(quantizer={"kind": "fsq", "colour_levels": [4, 4], "fsq_levels": [4, 4]})  # conv encoder
    with pytest.raises(ConfigError, match="colour_levels"):
        tiny_cfg(model={"encoder": "local"}, quantizer={"kind": "vq", "colour_levels": [4, 4]})


@pytest.mark.parametrize("structure_input", ["contrast", "ink_mask"])
def test_mapped_structure_codes_are_the_same_in_every_ink_untrained(tmp_path, structure_input):
    """structure_input=contrast or ink_mask: a shape's structure codes do not depend on its ink even
    before training (the map of one ink on white is the ink's mask), while its colour half does;
    the option round-trips through save/load and is refused without a structure half."""
    from anymodal.data.scenes import COLOURS, Scene, SceneObject, render_scene
    from anymodal.tokenizers.image import STRUCTURE_MAPS, contrast_map, ink_map

    cfg = _colour_structure_cfg(model={"structure_input": structure_input})
    torch.manual_seed(0)
    tok = ImageTokenizer(cfg).eval()
    inks = sorted(COLOURS)
    images = np.stack([render_scene(Scene(32, 32, (SceneObject(shape, ink, "large", (3, 5, 17, 19)),)))
                       for shape in ("triangle", "circle") for ink in inks])  # [12, 32, 32, 3]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        latents = tok.structure_positions(x * 2 - 1).view(2, len(inks), -1)  # [shape, ink, cells · d]
        colour = tok.encoder.colour(x * 2 - 1)  # [12, C, h, w]
    assert torch.equal(latents, latents[:, :1].expand_as(latents))  # every ink: the same structure
    assert not torch.allclose(latents[0], latents[1])  # a triangle is not a circle
    assert not torch.allclose(colour[0], colour[1])  # the colour half does see the ink
    ids = tok.encode(x).view(2, len(inks), -1)  # [shape, ink, cells]
    assert (ids // 16 == ids[:, :1] // 16).all()
    mask = torch.from_numpy((images[0] != 255).any(-1)).float()  # the triangle's ink
    structure_map = STRUCTURE_MAPS[structure_input]
    torch.testing.assert_close(structure_map(x[:1] * 2 - 1, 8, 0.2)[0, 0], mask)
    white, full = torch.ones(1, 3, 8, 8), torch.tensor([0.6, -0.8, 0.4]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert structure_map(white, 8, 0.2).abs().max() == 0  # a white cell: no structure
    # a cell wholly inside an object: blank like white in the contrast map, all ink in the ink mask
    torch.testing.assert_close(ink_map(full, 8, 0.2), torch.ones(1, 1, 8, 8))
    assert contrast_map(full, 8, 0.2).abs().max() == 0
    tok.save(tmp_path / "c")
    back = ImageTokenizer.load(tmp_path / "c")
    assert back.cfg.model.structure_input == structure_input and torch.equal(back.encode(x), tok.encode(x))
    with pytest.raises(ConfigError, match="structure_input"):
        tiny_cfg(model={"encoder": "local", "structure_input": structure_input})
    with pytest.raises(ConfigError, match="structure_input"):
        _colour_structure_cfg(model={"structure_input": "ink"})


def test_recolour_invariance_trains_structure_codes_that_ignore_the_ink(world, tmp_path):
    """Trained with loss.recolour_invariance, the structure codes of a scene and of the same scene
    in other inks agree far more often than without it, and the tokenizer still learns to draw."""
    from anymodal.train.image_tokenizer import _load_images, mix_colours

    raw = _load_images(world["val_shards"], tiny_cfg(), 32, None)  # uint8 [32, 32, 32, 3]
    other = mix_colours(raw, 1.0, seed=5, step=0)

    def structure_agreement(tok) -> float:
        a, b = (tok.encode(im.permute(0, 3, 1, 2).float() / 255) // 16 for im in (raw, other))
        return float((a == b).float().mean())

    def drift(tok) -> float:  # what the loss term measures, on held-out images
        with torch.no_grad():
            a, b = (tok.structure_positions(im.permute(0, 3, 1, 2).float() / 127.5 - 1) for im in (raw, other))
        return float((a - b).pow(2).mean())

    agree, moved, psnr = {}, {}, {}
    for w in (0.0, 1.0):
        cfg = _colour_structure_cfg(loss={"recolour_invariance": w}, data={**world},
                                    train={"steps": 150, "val_images": 48})
        torch.manual_seed(0)
        res = train(cfg, tmp_path / f"w{w}", progress=False)
        tok = ImageTokenizer.load(tmp_path / f"w{w}").eval()
        agree[w], moved[w], psnr[w] = structure_agreement(tok), drift(tok), res["final"]["psnr"]
    log = [json.loads(line) for line in (tmp_path / "w1.0" / "train_log.jsonl").read_text().splitlines()]
    assert any("recolour_drift" in r for r in log)
    assert moved[1.0] < 0.5 * moved[0.0], moved
    assert agree[1.0] > 0.9 and agree[1.0] > agree[0.0], agree
    untrained, _ = evaluate(ImageTokenizer(_colour_structure_cfg()), _load_images(world["val_shards"], cfg, 48, None))
    assert psnr[1.0] > untrained["psnr"] + 4, (untrained, psnr)

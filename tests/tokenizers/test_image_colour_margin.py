"""Colour augmentation and the margin loss of the image tokenizer trainer (issue #4)."""

import pytest
import torch

from anymodal.errors import ConfigError
from anymodal.tokenizers.image import load_image_config
from anymodal.tokenizers.image_losses import ImageLoss, margin_loss
from anymodal.train.image_tokenizer import mix_colours, permute_colours


def test_permute_colours_keeps_white_and_pixels_deterministic():
    b = torch.full((64, 4, 4, 3), 255, dtype=torch.uint8)
    b[:, 1:3, 1:3] = torch.tensor([220, 40, 90], dtype=torch.uint8)  # one object colour
    out = permute_colours(b, 0.5, seed=3, step=7)
    assert torch.equal(out, permute_colours(b, 0.5, seed=3, step=7))  # same (seed, step), same batch
    assert torch.equal(out[:, 0], b[:, 0])  # white background untouched
    obj = out[:, 1, 1]  # [64, 3]
    assert all(sorted(p.tolist()) == [40, 90, 220] for p in obj)  # channels permuted, values kept
    changed = (obj != b[:, 1, 1]).any(1).sum()
    assert 10 < int(changed) < 40  # about half are picked, 5 of 6 permutations differ
    assert torch.equal(permute_colours(b, 0.0, 3, 7), b)


def test_mix_colours_keeps_white_and_spreads_one_colour_over_many():
    b = torch.full((200, 4, 4, 3), 255, dtype=torch.uint8)
    b[:, 1:3, 1:3] = torch.tensor([140, 60, 180], dtype=torch.uint8)  # purple
    out = mix_colours(b, 0.5, seed=3, step=7)
    assert out.dtype == torch.uint8 and out.shape == b.shape
    assert torch.equal(out, mix_colours(b, 0.5, seed=3, step=7))  # same (seed, step), same batch
    assert not torch.equal(out, mix_colours(b, 0.5, seed=3, step=8))
    assert torch.equal(out[:, 0], b[:, 0])  # white stays white (zero ink maps to zero ink)
    obj = out[:, 1, 1].int()  # [200, 3]
    picked = (obj != b[:, 1, 1].int()).any(1)
    assert 70 < int(picked.sum()) < 130  # about half
    # rows of the mixing matrix sum to 1: every new ink channel lies between the old inks (75..195)
    ink = 255 - obj[picked]
    assert int(ink.min()) >= 75 - 1 and int(ink.max()) <= 195 + 1
    assert len({tuple(p) for p in obj[picked].tolist()}) > 50  # a spread of colours, not 6 permutations
    assert torch.equal(mix_colours(b, 0.0, 3, 7), b)


def test_margin_loss_ignores_small_errors():
    x = torch.zeros(1, 3, 2, 2)
    r = x.clone()
    r[0, :, 0, 0] = 0.05  # error 0.087 < margin
    assert float(margin_loss(x, r, 0.15)) == pytest.approx(0.0, abs=1e-6)
    r[0, :, 1, 1] = 0.3  # error 0.52: (0.52 - 0.15)^2 over 4 pixels
    assert float(margin_loss(x, r, 0.15)) == pytest.approx((0.3 * 3**0.5 - 0.15) ** 2 / 4, rel=1e-4)


def test_margin_term_enters_the_loss_and_config_checks():
    cfg = load_image_config(None, ["loss.margin_weight=8"])
    x = torch.zeros(1, 3, 4, 4)
    rec = torch.full_like(x, 0.5, requires_grad=True)
    loss, parts = ImageLoss(cfg.loss).generator_loss(x, rec, torch.zeros(()), 0)
    assert parts["margin"] == pytest.approx((0.5 * 3**0.5 - 0.15) ** 2, rel=1e-4)
    loss.backward()
    assert rec.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        load_image_config(None, ["train.colour_aug=1.5"])
    with pytest.raises(ConfigError):
        load_image_config(None, ["train.colour_mix=-0.1"])

"""lm_loss: CE and z-loss equal their formulas, gradients are right, per-modality parts add up."""

import pytest
import torch
import torch.nn.functional as F

from anymodal.model import lm_loss
from anymodal.model import loss as loss_mod


def _reference(logits, labels, w, ignore=-100):
    x = logits.double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    keep = y != ignore
    ce = F.cross_entropy(x, y, ignore_index=ignore)
    z = w * torch.logsumexp(x[keep], dim=-1).square().mean()
    return ce, z


@pytest.mark.parametrize("chunk_elements", [1 << 20, 50])  # 50: one row per chunk, many chunks
def test_ce_z_and_grads_match_formula(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 33)).requires_grad_()
    labels = torch.randint(0, 33, (3, 7))
    labels[0, :3] = -100
    labels[2, 6] = -100
    out = lm_loss(logits, labels, z_loss_weight=0.1)
    ref_logits = logits.detach().double().requires_grad_()
    ce, z = _reference(ref_logits, labels, 0.1)
    assert out.ce.dtype == out.z_loss.dtype == torch.float32
    torch.testing.assert_close(out.ce.double(), ce, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.z_loss.double(), z, atol=1e-6, rtol=1e-6)
    assert out.z_loss > 0.1  # lse² of logits with std 3 is large: the term is really there
    (out.ce + out.z_loss).backward()
    (ce + z).backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-6, rtol=1e-5)
    assert logits.grad[0, :3].abs().max() == 0  # ignored positions get no gradient


def test_bf16_logits_give_fp32_loss_and_bf16_grads():
    torch.manual_seed(0)
    logits32 = torch.randn(2, 5, 40)
    logits = logits32.bfloat16().requires_grad_()
    labels = torch.randint(0, 40, (2, 5))
    out = lm_loss(logits, labels, z_loss_weight=1e-2)
    assert out.ce.dtype == torch.float32
    ref = logits.detach().float().requires_grad_()
    ce, z = _reference(ref, labels, 1e-2)
    torch.testing.assert_close(out.ce.double(), ce, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    (ce + z).backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref.grad.float(), atol=2e-3, rtol=2e-2)


def test_per_modality_sums_add_up_to_total():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 20)
    labels = torch.randint(0, 20, (4, 9))
    labels[1, 4:] = -100
    modality = torch.randint(0, 4, (4, 9), dtype=torch.uint8)
    modality[:, 0] = 2  # make sure every modality occurs
    modality[:, 1] = 3
    out = lm_loss(logits, labels, modality)
    counts = {k: int(v) for k, v in out.per_modality_count.items()}
    assert set(counts) == {"text", "image", "audio", "loc"}
    keep = labels != -100
    assert sum(counts.values()) == int(keep.sum())
    total = sum(out.per_modality_sum.values()) / sum(counts.values())
    torch.testing.assert_close(total, out.ce, atol=1e-6, rtol=1e-6)
    for i, name in enumerate(("text", "image", "audio", "loc")):  # each part is that subset's CE
        sel = keep & (modality == i)
        ref = F.cross_entropy(logits[sel], labels[sel], reduction="sum")
        torch.testing.assert_close(out.per_modality_sum[name], ref, atol=1e-5, rtol=1e-5)
        assert counts[name] == int(sel.sum())
    means = out.per_modality_mean()
    assert means["image"] == pytest.approx(float(out.per_modality_sum["image"]) / counts["image"])


def test_no_labels_gives_zero_not_nan():
    logits = torch.randn(1, 3, 10, requires_grad=True)
    out = lm_loss(logits, torch.full((1, 3), -100))
    assert out.ce.item() == 0.0 and out.z_loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_same_grads_through_the_head(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 16)
    labels = torch.randint(0, 50, (2, 6))
    grads = []
    for inplace in (False, True):
        head = torch.nn.Linear(16, 50, bias=False).to(dtype)
        torch.manual_seed(1)
        torch.nn.init.normal_(head.weight)
        out = lm_loss(head(hidden.to(dtype)), labels, z_loss_weight=1e-3, inplace_backward=inplace)
        out.loss.backward()
        grads.append(head.weight.grad.float())
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_inplace_backward_with_a_second_use_of_the_logits_is_right_or_loud():
    torch.manual_seed(0)
    base = torch.randn(1, 4, 10)
    labels = torch.randint(0, 10, (1, 4))
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1.0  # non-leaf, like a head output
        total = lm_loss(logits, labels, inplace_backward=inplace).loss + (logits**2).mean()
        try:
            total.backward()
        except RuntimeError as e:  # the other use needed logits after they were overwritten
            assert inplace and "modified by an inplace operation" in str(e)
            return
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])

"""Export: a run's checkpoint (ZeRO-0 or consolidated ZeRO-3) -> a bundle that reproduces the live model."""

from __future__ import annotations

import copy

import pytest
import torch

from anymodal.errors import UserError
from anymodal.sample.bundle import load_bundle
from anymodal.train.export import export
from anymodal.train.lm import load_train_config, train


def _batch(tok):
    from anymodal.tokenizers.stream import Text

    ids, _ = tok.stream.encode([Text("a red circle")])
    return torch.as_tensor(ids)[None]  # [1, N]


def test_export_bundle_gives_the_live_logits(tiny_args, tiny_tokset, tmp_path):
    tok_dir, tok = tiny_tokset
    res = train(load_train_config("train/demo", [*tiny_args, "steps=6", "checkpoint_every=100"]))
    bundle = export(res.run_dir, tmp_path / "bundle")
    for name in ("config.yaml", "model.safetensors", "token_space.json", "train_config.yaml", "export.json",
                 "text/text.model", "image/model.safetensors", "audio/model.safetensors"):
        assert (bundle / name).is_file(), name
    b = load_bundle(bundle, device="cpu")
    cfg = b.model.cfg
    assert cfg.activation_checkpointing is False and cfg.vocab_size == tok.space.vocab_size
    assert b.space == tok.space and not b.model.training
    x = _batch(tok)
    live = res.model.eval()
    with torch.no_grad():
        assert torch.equal(b.model(x), live(x))
    # exporting again replaces the bundle atomically; a run without checkpoints is a user error
    export(res.run_dir, bundle)
    assert not list(tmp_path.glob("bundle.*"))
    with pytest.raises(UserError):
        export(tmp_path / "nowhere", tmp_path / "b2")


def test_tied_embeddings_train_as_one_matrix_and_export(tiny_args, tiny_tokset, tmp_path):
    from safetensors.torch import load_file

    tok_dir, tok = tiny_tokset
    res = train(load_train_config("train/demo", [*tiny_args, "steps=4", "model.tie_embeddings=true"]))
    live = res.model.eval()
    assert live.head.weight is live.tok_emb.weight  # still one tensor after the optimizer's steps
    bundle = export(res.run_dir, tmp_path / "bundle")
    assert "head.weight" not in load_file(str(bundle / "model.safetensors"))  # stored once
    b = load_bundle(bundle, device="cpu")
    assert b.model.head.weight is b.model.tok_emb.weight
    x = _batch(tok)
    with torch.no_grad():
        assert torch.equal(b.model(x), live(x))


def test_export_consolidates_zero3(tiny_args, tiny_tokset, tmp_path, monkeypatch):
    import deepspeed

    # ZeRO-3 replaces torch.nn.functional.linear for the whole process; later tests get it back
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)

    _, tok = tiny_tokset
    res = train(load_train_config("train/demo", [*tiny_args, "zero_stage=3", "steps=3", "checkpoint_every=100"]))
    model = load_bundle(export(res.run_dir, tmp_path / "bundle3"), device="cpu").model
    live = res.model
    params = list(live.parameters())
    with deepspeed.zero.GatheredParameters(params):  # ZeRO-3 keeps only a partition in each parameter
        full = {k: v.detach().clone() for k, v in live.state_dict().items()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k
    assert not all(torch.equal(v, full[k]) for k, v in _init_state(model).items())  # it did train


def _init_state(model):
    from anymodal.model import Transformer

    torch.manual_seed(0)
    return Transformer(model.cfg).state_dict()


def _colour_structure_tokenizers(tok_dir, tok, out):
    """A copy of the tiny tokenizer set whose image tokenizer has (colour, structure) codes: 4 x 8,
    as many codes as the tiny one, so the prepared tiny corpus still fits."""
    import shutil

    from anymodal.tokenizers.image import ImageTokenizer

    shutil.copytree(tok_dir, out)
    cfg = copy.deepcopy(tok.image.cfg)
    cfg.model.encoder, cfg.quantizer.kind = "local", "fsq"
    cfg.quantizer.colour_levels, cfg.quantizer.fsq_levels = [4], [8]
    image = ImageTokenizer(cfg)
    assert image.codebook_size == tok.space.image_codebook_size and image.code_factors == [4, 8]
    shutil.rmtree(out / "image")
    image.save(out / "image")
    return out


def test_factored_code_embeddings_train_and_export_as_a_plain_table(tiny_args, tiny_tokset, tmp_path):
    tok_dir, tok = tiny_tokset
    toks = _colour_structure_tokenizers(tok_dir, tok, tmp_path / "toks")
    res = train(load_train_config("train/demo", [*tiny_args, "steps=4", "model.tie_embeddings=true",
                                                 "image_code_embedding=factored", f"tokenizers={toks}"]))
    live = res.model.eval()
    sp = tok.space
    assert live.cfg.code_offset == sp.image_offset and live.cfg.code_factors == [4, 8]
    colours, structures = live.code_factors.tables
    table = live.embedding_table().detach()
    code = 13  # colour 1, structure 3
    torch.testing.assert_close(table[sp.image_offset + code], (colours[1] + structures[3]).detach())
    bundle = export(res.run_dir, tmp_path / "bundle", tokenizers=toks)
    b = load_bundle(bundle, device="cpu")
    assert b.model.code_factors is None and b.model.cfg.code_factors == []
    x = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), live(x), rtol=0, atol=1e-5)


def test_factored_code_embeddings_refuse_a_plain_table_start_and_zero3(tiny_args, tmp_path):
    from anymodal.errors import ConfigError

    with pytest.raises(UserError, match="factored"):
        train(load_train_config("train/demo", [*tiny_args, "steps=1", "image_code_embedding=factored",
                                               f"init_from={tmp_path}"]))
    with pytest.raises(ConfigError, match="factored"):
        load_train_config("train/demo", [*tiny_args, "image_code_embedding=factored", "zero_stage=3"])


def test_image_colour_dropout_leaves_the_colour_out_of_whole_answer_images(tiny_args, tiny_tokset, tmp_path,
                                                                          monkeypatch):
    import anymodal.train.lm as lm
    from anymodal.errors import ConfigError

    tok_dir, tok = tiny_tokset
    toks = _colour_structure_tokenizers(tok_dir, tok, tmp_path / "toks")
    real, seen = lm.colour_dropout, []

    def spy(micro, share, seed):
        mask = real(micro, share, seed)
        seen.append((micro, mask))
        return mask

    monkeypatch.setattr(lm, "colour_dropout", spy)
    res = train(load_train_config("train/demo", [*tiny_args, "steps=3", "seed=5", "image_code_embedding=factored",
                                                 "image_colour_dropout=0.5", f"tokenizers={toks}"]))
    assert res.step == 3 and res.skipped_steps == 0
    sp = tok.space
    dropped_codes = 0
    for micro, mask in seen:
        ids, doc, answer = micro["ids"], micro["doc_ids"], micro["answer"]
        assert not (mask & ~answer).any()  # prompts and prompt images keep their colour
        for b in range(len(ids)):
            for k in doc[b].unique():  # a document piece's answer is dropped whole or kept whole
                part = mask[b][(doc[b] == k) & answer[b]]
                assert part.all() or not part.any()
        codes = (ids >= sp.image_offset) & (ids < sp.image_offset + sp.image_codebook_size)
        dropped_codes += int((mask & codes).sum())
        assert torch.equal(real(micro, 0.5, 5), mask)  # the draw is the batch's own: resumable, rank-free
        assert torch.equal(real(micro, 1.0, 5), answer) and real(micro, 0.0, 5) is None
    assert dropped_codes > 0
    assert sum(int(m.sum()) for _, m in seen) < sum(int(mc["answer"].sum()) for mc, _ in seen)  # some kept
    # the model reads the images it draws as it learnt to: the bundle keeps the factors and decodes blind
    live = res.model.eval()
    assert live.cfg.blind_decode
    b = load_bundle(export(res.run_dir, tmp_path / "bundle", tokenizers=toks), device="cpu")
    assert b.model.cfg.blind_decode and b.model.cfg.code_factors == [4, 8]
    x = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), live(x), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="factored"):
        load_train_config("train/demo", [*tiny_args, "image_colour_dropout=0.5"])

"""``LanguageReconstruction`` (CRFormer): the cosine loss, the reconstructor, both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from objective_models import (
    SMALL,
    WIDTH,
    assert_all_grads,
    hooks_batch,
    hooks_wrapper,
    towers_batch,
    towers_wrapper,
    train_step,
)

from masksd.objectives import LanguageReconstruction, LanguageReconstructionConfig
from masksd.objectives.reconstruction import reconstruction_loss


def reconstruction(**config) -> LanguageReconstruction:
    torch.manual_seed(5)
    return LanguageReconstruction(fused_dim=WIDTH, text_dim=WIDTH,
                                  config=LanguageReconstructionConfig(**{**SMALL, "dropout": 0.0, **config}))


def test_loss_by_hand():
    prediction = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    target = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    supervised = torch.tensor([[True, True, False]])
    expected = ((1 - 1.0) + (1 - 2 / (2 * 2**0.5))) / 2  # cos = 1 and 1/√2; the third is not supervised
    torch.testing.assert_close(reconstruction_loss(prediction, target, supervised), torch.tensor(expected))
    assert reconstruction_loss(target, target, torch.ones(1, 3, dtype=torch.bool)).abs() < 1e-6  # perfect


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.floats(0.01, 100.0))
def test_scale_invariance_and_unsupervised_positions_do_not_count(seed, scale):
    g = torch.Generator().manual_seed(seed)
    prediction, target = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    supervised = torch.rand(2, 5, generator=g) > 0.4
    loss = reconstruction_loss(prediction, target, supervised)
    torch.testing.assert_close(reconstruction_loss(prediction * scale, target / scale, supervised), loss)
    changed = torch.where(supervised[..., None], target, torch.randn(2, 5, 4, generator=g))
    torch.testing.assert_close(reconstruction_loss(prediction, changed, supervised), loss)


def test_the_target_is_detached_and_nothing_supervised_keeps_the_graph():
    prediction = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, requires_grad=True)
    reconstruction_loss(prediction, target, torch.ones(2, 3, dtype=torch.bool)).backward()
    assert target.grad is None and prediction.grad is not None
    prediction.grad = None
    empty = reconstruction_loss(prediction, target, torch.zeros(2, 3, dtype=torch.bool))
    assert empty == 0
    empty.backward()
    assert torch.equal(prediction.grad, torch.zeros_like(prediction))


def test_reconstructor_by_hand():
    rec = reconstruction(max_len=6).eval()
    fused = torch.randn(2, 9, WIDTH)
    memory = rec.source[1](F.layer_norm(fused, (WIDTH,), rec.source[0].weight, rec.source[0].bias))
    queries = rec.queries[:4].expand(2, -1, -1)
    expected = rec.out(rec.decoder(queries, memory))
    torch.testing.assert_close(rec.reconstruct(fused, 4), expected)
    assert rec.reconstruct(fused, 4).shape == (2, 4, WIDTH)
    with pytest.raises(ValueError, match="max_len=6"):
        rec.reconstruct(fused, 7)


@pytest.mark.parametrize("backend", ["towers", "hooks"])
def test_in_the_wrapper_fused_from_the_main_pass_and_every_parameter_trained(backend):
    build, batch = (towers_wrapper, towers_batch) if backend == "towers" else (hooks_wrapper, hooks_batch)
    rec = reconstruction()
    seen = {}

    def record(module, args, output):
        context, runner = args
        fused = runner.fused(context)
        words = context.encoded("text").tokens.detach()
        prediction = module.reconstruct(fused.tokens, words.shape[1])
        seen["fused"] = fused.tokens
        seen["expected"] = reconstruction_loss(prediction, words, context.embedded("text").maskable).detach()

    rec.register_forward_hook(record)
    wrapper = build([rec])
    decoder_inputs = []
    decoder = wrapper.unwrap().decoder
    decoder.register_forward_pre_hook(lambda module, args: decoder_inputs.append(args))
    if backend == "hooks":
        train_step(wrapper, batch())  # the one-off fusion probe
        decoder_inputs.clear()
    out = train_step(wrapper, batch())
    torch.testing.assert_close(out.losses["lang_rec"], seen["expected"])
    if backend == "towers":  # main, LMVSD, VMLSD: each through forward_with_fused (the fused of the main's)
        assert decoder.passes == 3 and len(decoder_inputs) == 0
    else:  # main, LMVSD, VMLSD; the tap saw the main branch's decoder input, not a masked branch's
        assert len(decoder_inputs) == 3
        assert torch.equal(seen["fused"], decoder_inputs[0][0].flatten(2).transpose(1, 2))
    assert -1 <= float(out.selections["lang_rec"]["cosine"]) <= 1
    out.loss.backward()
    assert_all_grads(wrapper)


@pytest.mark.parametrize("backend", ["towers", "hooks"])
def test_all_positions_means_every_non_pad_position(backend):
    """``positions="all"``: SOT/EOT and words, never padding (towers: the tower's pad mask; hooks:
    the ids' trailing pad run)."""
    build, batch = (towers_wrapper, towers_batch) if backend == "towers" else (hooks_wrapper, hooks_batch)
    images, ids, target = batch()
    pad = ids == 0  # both tiny models pad with id 0
    assert pad.any()
    out = train_step(build([reconstruction(positions="all")], lmvsd=None, vmlsd=None), (images, ids, target))
    assert torch.equal(out.selections["lang_rec"]["supervised"], ~pad)
    assert torch.isfinite(out.selections["lang_rec"]["cosine"])


def test_nothing_supervised_reports_no_cosine():
    """A word-less batch with ``positions="words"``: loss 0 in the graph, cosine NaN (not a perfect 1)."""
    images, ids, target = towers_batch()
    ids = torch.zeros_like(ids)
    ids[:, :2] = torch.tensor([1, 2])  # SOT, EOT
    wrapper = towers_wrapper([reconstruction()], vmlsd=None)
    out = train_step(wrapper, (images, ids, target))
    info = out.selections["lang_rec"]
    assert not info["supervised"].any() and out.losses["lang_rec"] == 0
    assert torch.isnan(info["cosine"])
    out.loss.backward()
    assert_all_grads(wrapper)


def test_towers_fused_is_the_main_pass_not_a_masked_one():
    rec = reconstruction()
    seen = {}
    rec.register_forward_pre_hook(lambda module, args: seen.update(fused=args[1].fused(args[0]).tokens))
    wrapper = towers_wrapper([rec])
    decoder = wrapper.unwrap().decoder
    history = []
    original = decoder.forward_with_fused

    def recording(image, text):
        logits, fused = original(image, text)
        history.append(fused)
        return logits, fused

    decoder.forward_with_fused = recording
    out = train_step(wrapper, towers_batch())
    assert torch.equal(
        seen["fused"], history[0].flatten(2).transpose(1, 2)
    )  # the first pass is the main branch
    assert len(history) == 3  # main, LMVSD, VMLSD: no extra decoder pass for the objective
    wrapper.eval()
    images, ids, _ = towers_batch()
    with torch.no_grad():
        assert torch.equal(wrapper(images, ids), wrapper.unwrap()(images, ids))
    assert out.logits.shape == (4, 1, 8, 8)


def test_errors():
    with pytest.raises(ValueError, match="positions"):
        LanguageReconstructionConfig(positions="some")
    with pytest.raises(ValueError, match="divisible"):
        LanguageReconstructionConfig(width=10, heads=3)
    with pytest.raises(TypeError, match="config"):
        LanguageReconstruction(fused_dim=4, text_dim=4, config={"weight": 1})
    wrapper = towers_wrapper(
        [LanguageReconstruction(fused_dim=8, text_dim=16, config=LanguageReconstructionConfig(**SMALL))]
    )
    with pytest.raises(ValueError, match="fused_dim=16"):
        train_step(wrapper, towers_batch())
    wrapper = towers_wrapper([reconstruction(max_len=4)])
    with pytest.raises(ValueError, match="max_len"):
        train_step(wrapper, towers_batch())

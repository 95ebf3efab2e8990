"""``CrossModalAlignment`` (MagNet's CAL): the loss by hand, its properties, both feature sources."""

from __future__ import annotations

import math

import hook_models
import pytest
import tiny_models
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from objective_models import (
    WIDTH,
    assert_all_grads,
    hooks_batch,
    hooks_wrapper,
    towers_batch,
    towers_wrapper,
    train_step,
)
from tiny_models import make_model

from masksd import MaskedSelfDistill
from masksd.objectives import CrossModalAlignment, CrossModalAlignmentConfig
from masksd.objectives._common import target_on_grid
from masksd.objectives.alignment import alignment_loss

TAU = 0.07


def separated(positives: int, negatives: int, boundary: int = 0, *, same: bool = False):
    """One sample: positives = u, negatives = -u (or = u when ``same``), boundary cells random."""
    u = torch.tensor([1.0, 0.0, 0.0])
    n = positives + negatives + boundary
    features = torch.randn(1, n, 3)
    features[0, :positives] = u
    features[0, positives : positives + negatives] = u if same else -u
    fraction = torch.zeros(1, n)
    fraction[0, :positives] = 1.0
    fraction[0, positives + negatives :] = 0.3  # boundary: neither positive nor negative
    return features, u[None], fraction


def test_perfect_separation_closed_form():
    features, u, fraction = separated(3, 5, boundary=2)
    loss, info = alignment_loss(features, u, fraction, temperature=TAU)
    expected = math.log(1 + 5 * math.exp(-2 / TAU))  # both terms: the prototype is u too
    torch.testing.assert_close(info["p2t"], torch.tensor(expected))
    torch.testing.assert_close(info["p2p"], torch.tensor(expected))
    torch.testing.assert_close(loss, torch.tensor(2 * expected))
    assert info["positives"].sum() == 3 and info["negatives"].sum() == 5


def test_indistinguishable_features_give_log_one_plus_negatives():
    features, u, fraction = separated(2, 4, boundary=3, same=True)
    loss, _ = alignment_loss(features, u, fraction, temperature=TAU, p2t_weight=1.0, p2p_weight=0.5)
    torch.testing.assert_close(loss, torch.tensor(1.5 * math.log(5)))


def test_invalid_samples_are_excluded_without_nan():
    features = torch.randn(3, 6, 4, requires_grad=True)
    sentence = torch.randn(3, 4, requires_grad=True)
    fraction = torch.stack([torch.zeros(6), torch.ones(6), torch.tensor([1.0, 0, 0, 0, 0, 0])])
    loss, info = alignment_loss(features, sentence, fraction)
    assert info["valid"].tolist() == [False, False, True]
    alone, _ = alignment_loss(features[2:], sentence[2:], fraction[2:])
    torch.testing.assert_close(loss, alone)
    none, _ = alignment_loss(features[:2], sentence[:2], fraction[:2])
    assert none == 0
    none.backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(sentence.grad).all()


def test_small_object_falls_back_to_its_largest_cell():
    fraction = torch.tensor([[0.0, 0.2, 0.4, 0.0]])
    _, info = alignment_loss(torch.randn(1, 4, 3), torch.randn(1, 3), fraction)
    assert info["positives"].tolist() == [[False, False, True, False]]
    assert info["negatives"].tolist() == [[True, False, False, True]]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.floats(0.01, 100.0), batch=st.integers(1, 4),
       cells=st.integers(2, 12))
def test_invariances(seed, scale, batch, cells):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, cells, 5, generator=g, dtype=torch.float64).float()
    sentence = torch.randn(batch, 5, generator=g)
    fraction = (torch.rand(batch, cells, generator=g) * 3 - 1).clamp(0, 1)  # zeros, partial and full cells
    loss, _ = alignment_loss(features, sentence, fraction)
    assert torch.isfinite(loss)
    permutation = torch.randperm(cells, generator=g)
    order = torch.randperm(batch, generator=g)
    checks = [
        # cells jointly permuted
        alignment_loss(features[:, permutation], sentence, fraction[:, permutation])[0],
        alignment_loss(features * scale, sentence * scale, fraction)[0],  # positive rescaling
        alignment_loss(features[order], sentence[order], fraction[order])[0],  # batch order
    ]
    for value in checks:
        torch.testing.assert_close(value, loss, rtol=1e-4, atol=1e-5)


def test_moving_a_positive_towards_the_sentence_lowers_the_loss():
    features, u, fraction = separated(2, 3)
    features[0, :2] = torch.tensor([0.0, 1.0, 0.0])
    losses = []
    for step in torch.linspace(0, 1, 6):
        moved = features.clone()
        moved[0, 0] = (1 - step) * torch.tensor([0.0, 1.0, 0.0]) + step * u[0]
        losses.append(alignment_loss(moved, u, fraction, p2p_weight=0.0)[0].item())
    assert all(a >= b for a, b in zip(losses, losses[1:]))


def test_target_on_grid_keeps_the_area():
    target = torch.zeros(2, 32, 32)
    target[0, 3:20, 5:11] = 1
    target[1, 8:16, 8:16] = 1
    fraction = target_on_grid(target, (4, 4))
    torch.testing.assert_close(fraction.sum(1) * 64, target.sum((1, 2)))
    assert fraction[1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]


# ------------------------------------------------------------------------------ in the wrapper


@pytest.mark.parametrize("backend", ["towers", "hooks"])
def test_encoder_variant_trains_both_towers_and_matches_the_pure_loss(backend):
    build, batch = (towers_wrapper, towers_batch) if backend == "towers" else (hooks_wrapper, hooks_batch)
    cal = CrossModalAlignment()
    seen = {}

    def record(module, args, output):  # while the step's backend still holds the main branch
        context, runner = args
        image, text = runner.encoded_with_grad(context, "image"), runner.encoded_with_grad(context, "text")
        assert image.tokens.requires_grad and text.global_feature.requires_grad
        # the same features
        torch.testing.assert_close(image.tokens.detach(), context.encoded("image").tokens)
        fraction = target_on_grid(context.target, output.info["grid"])
        seen["expected"] = alignment_loss(image.tokens, text.global_feature, fraction)[0]

    cal.register_forward_hook(record)
    wrapper = build([cal])
    out = train_step(wrapper, batch())
    torch.testing.assert_close(out.losses["cal"], seen["expected"].detach())
    assert out.selections["cal"]["valid"].any()
    assert list(wrapper.objectives["cal"].parameters()) == []
    out.loss.backward()
    assert_all_grads(wrapper)


@pytest.mark.parametrize("backend", ["towers", "hooks"])
def test_fused_variant_uses_the_main_decoder_pass(backend):
    build, batch = (towers_wrapper, towers_batch) if backend == "towers" else (hooks_wrapper, hooks_batch)
    cal = CrossModalAlignment(config=CrossModalAlignmentConfig(features="fused"), text_dim=WIDTH,
                              fused_dim=WIDTH)
    wrapper = build([cal], lmvsd=None, vmlsd=None)
    decoder_inputs = []
    decoder = wrapper.unwrap().decoder
    decoder.register_forward_pre_hook(lambda module, args: decoder_inputs.append(args))
    if backend == "hooks":
        train_step(wrapper, batch())  # the one-off fusion probe runs the model once more
        decoder_inputs.clear()
    out = train_step(wrapper, batch())
    if backend == "towers":
        assert decoder.passes == 1 and decoder_inputs == []  # forward_with_fused, once: no second pass
        fused = decoder.last_fused
    else:
        assert len(decoder_inputs) == 1
        fused = decoder_inputs[0][0]
    assert out.selections["cal"]["grid"] == tuple(fused.shape[-2:])
    out.loss.backward()
    assert wrapper.objectives["cal"].sentence_proj.weight.grad.abs().sum() > 0
    assert_all_grads(wrapper)


def test_config_and_construction_errors():
    with pytest.raises(ValueError, match="temperature"):
        CrossModalAlignmentConfig(temperature=0.0)
    with pytest.raises(ValueError, match="features"):
        CrossModalAlignmentConfig(features="pixels")
    with pytest.raises(ValueError, match="pos_threshold"):
        CrossModalAlignmentConfig(pos_threshold=0.0)
    with pytest.raises(ValueError, match="text_dim= and fused_dim="):
        CrossModalAlignment(config=CrossModalAlignmentConfig(features="fused"))
    with pytest.raises(ValueError, match="drop them"):
        CrossModalAlignment(text_dim=4)
    with pytest.raises(ValueError, match="same width"):
        alignment_loss(torch.randn(1, 4, 3), torch.randn(1, 5), torch.zeros(1, 4))
    image_tower, text_tower, decoder = make_model(0)  # TinyDecoder: no forward_with_fused
    wrapper = MaskedSelfDistill(image_tower, text_tower, decoder, extra_objectives=[
        CrossModalAlignment(config=CrossModalAlignmentConfig(features="fused"), text_dim=16, fused_dim=16)])
    with pytest.raises(TypeError, match="forward_with_fused"):
        train_step(wrapper, towers_batch())
    wrapper = hooks_wrapper([CrossModalAlignment(config=CrossModalAlignmentConfig(features="fused"),
                                                 text_dim=16, fused_dim=16)], spec=hook_models.tiny_spec())
    with pytest.raises(TypeError, match="HookSpec.fused"):
        train_step(wrapper, hooks_batch())


@tiny_models.requires_bf16_masked_attention
def test_bf16_autocast_is_finite():
    wrapper = towers_wrapper([CrossModalAlignment()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_step(wrapper, towers_batch())
    assert out.losses["cal"].dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert_all_grads(wrapper)

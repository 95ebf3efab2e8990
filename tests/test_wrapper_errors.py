"""``MaskedSelfDistill`` with tiny pure-torch towers: argument errors, autocast, extra objectives."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from tiny_models import assert_all_grads, make_model
from tiny_models import tiny_batch as batch
from tiny_models import tiny_step as step
from tiny_models import tiny_wrapper as wrap
from torch import nn

from masksd import LMVSDConfig, MaskedSelfDistill, Objective, VMLSDConfig
from masksd.objectives import BranchConfig, ObjectiveOutput

MASK_TOKENS = {"objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"}


# ---------------------------------------------------------------------------------- (g) errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 1.5}, ValueError, "top_k"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"ratio": 2}, ValueError, "ratio"),
        ({"ratio": -0.5}, ValueError, "ratio"),
        ({"weight": -1}, ValueError, "weight"),
        ({"weight": "1"}, TypeError, "weight"),
        ({"metric": "l2"}, ValueError, "metric"),
    ],
)
def test_bad_branch_configs(kwargs, error, match):
    for config in (LMVSDConfig, VMLSDConfig, BranchConfig):
        with pytest.raises(error, match=match):
            config(**kwargs)


def test_branch_config_is_keyword_only():
    with pytest.raises(TypeError):
        LMVSDConfig(True, 0.5)  # type: ignore[misc]


def test_bad_wrapper_arguments():
    image_tower, text_tower, decoder = make_model()
    with pytest.raises(TypeError, match="lmvsd"):
        MaskedSelfDistill(image_tower, text_tower, decoder, lmvsd="yes")
    with pytest.raises(TypeError, match="vmlsd"):
        MaskedSelfDistill(image_tower, text_tower, decoder, vmlsd=0.1)
    with pytest.raises(ValueError, match="supervision"):
        MaskedSelfDistill(image_tower, text_tower, decoder, supervision="gt")
    with pytest.raises(ValueError, match="seg_weight"):
        MaskedSelfDistill(image_tower, text_tower, decoder, seg_weight=-1.0)
    with pytest.raises(TypeError, match="extra_objectives"):
        MaskedSelfDistill(image_tower, text_tower, decoder, extra_objectives=[nn.Linear(2, 2)])


class _NotAModule:
    embed_dim = 16

    def embed(self, inputs):
        raise NotImplementedError

    def encode(self, embedded):
        raise NotImplementedError


class _NoEmbedDim(nn.Module):
    def embed(self, inputs):
        raise NotImplementedError

    def encode(self, embedded):
        raise NotImplementedError


class _NoEncode(nn.Module):
    embed_dim = 16

    def embed(self, inputs):
        raise NotImplementedError


def test_bad_towers():
    image_tower, text_tower, decoder = make_model()
    with pytest.raises(TypeError, match="image_tower.*nn.Module"):
        MaskedSelfDistill(_NotAModule(), text_tower, decoder)
    with pytest.raises(TypeError, match="text_tower.*nn.Module"):
        MaskedSelfDistill(image_tower, _NotAModule(), decoder)
    with pytest.raises(TypeError, match="embed_dim"):
        MaskedSelfDistill(_NoEmbedDim(), text_tower, decoder)
    with pytest.raises(TypeError, match="encode"):
        MaskedSelfDistill(image_tower, _NoEncode(), decoder)
    with pytest.raises(TypeError, match="decoder"):
        MaskedSelfDistill(image_tower, text_tower, "decoder")
    bad_width = make_model()[0]
    bad_width.embed_dim = 0
    with pytest.raises(TypeError, match="embed_dim"):
        MaskedSelfDistill(bad_width, text_tower, decoder)


def test_missing_target_in_training():
    wrapper = wrap().train()
    images, ids, _ = batch()
    with pytest.raises(ValueError, match="target"):
        wrapper(images, ids)


def test_mismatched_joint_space_width():
    wrapper = wrap(text_dim=12)
    images, ids, target = batch()
    with torch.no_grad():  # the bare model itself works: its decoder handles both widths
        assert wrapper.eval()(images, ids).shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="width D"):
        step(wrapper, (images, ids, target))
    with pytest.raises(ValueError, match="width D"):
        step(wrap(text_dim=12, lmvsd=None), (images, ids, target))


# ------------------------------------------------------------------------------- (h) autocast


@tiny_models.requires_bf16_masked_attention
def test_bf16_autocast_gives_finite_float32_losses():
    wrapper = wrap(lmvsd=LMVSDConfig(ratio=0.5), vmlsd=VMLSDConfig(ratio=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step(wrapper)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    for value in out.losses.values():
        assert value.dtype == torch.float32 and torch.isfinite(value)
    out.loss.backward()
    assert_all_grads(wrapper)


# ------------------------------------------------------------------------ (i) extra objectives


class LogitEnergy(Objective):
    name = "energy"
    weight = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, step, runner):
        self.seen = step
        loss = (self.scale * step.logits.float()).pow(2).mean()
        return ObjectiveOutput(loss=loss, info={"energy_map": step.logits.detach().pow(2)})


def test_extra_objective_adds_its_loss_term():
    energy = LogitEnergy()
    wrapper = wrap(extra_objectives=[energy])
    assert "objectives.energy.scale" in wrapper.state_dict()
    images, ids, target = batch()
    out = step(wrapper, (images, ids, target))
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd", "energy"}
    assert "energy_map" in out.selections["energy"]
    torch.testing.assert_close(out.losses["energy"], out.logits.detach().pow(2).mean())
    torch.testing.assert_close(
        out.loss,
        out.losses["seg"]
        + 0.75 * out.losses["lmvsd"]
        + 0.1 * out.losses["vmlsd"]
        + 0.5 * out.losses["energy"],
    )
    context = energy.seen
    assert context.model is wrapper.unwrap()
    assert context.target is target
    assert context.logits is out.logits
    out.loss.backward()
    assert_all_grads(wrapper)


def test_extra_objective_name_clash():
    clash = LogitEnergy()
    clash.name = "lmvsd"
    with pytest.raises(ValueError, match="lmvsd"):
        wrap(extra_objectives=[clash])
    seg = LogitEnergy()
    seg.name = "seg"
    with pytest.raises(ValueError, match="seg"):
        wrap(extra_objectives=[seg])
    # without the default branch, the name is free
    assert "lmvsd" in wrap(lmvsd=None, extra_objectives=[clash]).objectives

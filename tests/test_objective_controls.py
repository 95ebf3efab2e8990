"""Changing objectives during training: ``set_weights`` and ``disabled_objectives``."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hook_models import TinyRIS, make_batch, tiny_spec

import masksd
from masksd.objectives import CrossModalAlignment


def wrapped(**options) -> masksd.MaskedSelfDistill:
    torch.manual_seed(0)
    return masksd.wrap(TinyRIS(), tiny_spec(), **options).train()


def step(wrapper, seed: int = 0):
    images, ids, masks = make_batch()
    return wrapper(images, ids, target=masks, generator=torch.Generator().manual_seed(seed))


def model_calls(wrapper) -> list[int]:
    calls = [0]
    wrapper.unwrap().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_set_weights_changes_the_total_and_the_saved_configuration():
    wrapper = wrapped(extra_objectives=[CrossModalAlignment()])
    wrapper.set_weights(seg=0.5, lmvsd=2.0, vmlsd=0.0, cal=0.3)
    out = step(wrapper)
    expected = 0.5 * out.losses["seg"] + 2.0 * out.losses["lmvsd"] + 0.3 * out.losses["cal"]
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.losses["vmlsd"] > 0  # weight 0 still runs the branch and reports its loss
    config = wrapper.config
    assert (config.seg_weight, config.lmvsd.weight, config.vmlsd.weight) == (0.5, 2.0, 0.0)
    assert wrapper.objectives["cal"].config.weight == 0.3
    restored = masksd.DistillConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    for bad in (-1.0, math.nan, math.inf, True, "0.5"):
        with pytest.raises(ValueError, match=r"set_weights: lmvsd must be a finite number >= 0"):
            wrapper.set_weights(lmvsd=bad)
    with pytest.raises(ValueError,
                       match=r"no objective named \['lmvds'\]; this wrapper has \['lmvsd', 'vmlsd', 'cal'\]"):
        wrapper.set_weights(lmvds=1.0)
    assert wrapper.config == config  # nothing changed by a refused call


def test_disabled_objectives_skip_their_branches_and_restore_on_exit():
    wrapper = wrapped()
    step(wrapper)  # the first step also probes the fusion type once
    wrapper.zero_grad(set_to_none=True)
    calls = model_calls(wrapper)
    with wrapper.disabled_objectives():
        out = step(wrapper)
    assert calls[0] == 1 and out.losses.keys() == {"seg"} and out.selections == {}
    torch.testing.assert_close(out.loss.detach(), out.losses["seg"])
    out.loss.backward()
    assert all(p.grad is None for p in wrapper.added_parameters().values())  # mask tokens unused

    calls[0] = 0
    with wrapper.disabled_objectives("vmlsd"):
        with wrapper.disabled_objectives("lmvsd"):  # nested: both off
            assert step(wrapper).losses.keys() == {"seg"}
        out = step(wrapper)
    assert out.losses.keys() == {"seg", "lmvsd"}
    with pytest.raises(RuntimeError, match="boom"), wrapper.disabled_objectives():
        raise RuntimeError("boom")
    assert step(wrapper).losses.keys() == {"seg", "lmvsd", "vmlsd"}  # back on after the blocks
    with pytest.raises(ValueError, match=r"disabled_objectives: no objective named \['mask_grounding'\]"):
        with wrapper.disabled_objectives("mask_grounding"):
            pass


def test_a_disabled_step_equals_the_same_step_of_a_wrapper_without_objectives():
    off = wrapped()
    plain = wrapped(lmvsd=None, vmlsd=None)
    plain.unwrap().load_state_dict(off.unwrap().state_dict())
    with off.disabled_objectives():
        a = step(off)
    b = step(plain)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)
    assert dataclasses.replace(off.config, lmvsd=None, vmlsd=None) == plain.config

"""All the auxiliary objectives (CAL on both feature sources) together with LMVSD/VMLSD, on both backends."""

from __future__ import annotations

import pytest
import torch
from objective_models import (
    ALL_OBJECTIVES,
    all_objectives,
    assert_all_grads,
    hooks_batch,
    hooks_wrapper,
    towers_batch,
    towers_wrapper,
    train_step,
)
from tiny_models import EOT, SOT

from masksd import LMVSDConfig, VMLSDConfig

BACKENDS = {"towers": (towers_wrapper, towers_batch), "hooks": (hooks_wrapper, hooks_batch)}
BRANCHES = dict(lmvsd=LMVSDConfig(ratio=0.5), vmlsd=VMLSDConfig(ratio=0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_objectives_do_not_change_the_lmvsd_vmlsd_masks(backend):
    """They run after lmvsd/vmlsd and draw from the shared generator only then."""
    build, batch = BACKENDS[backend]
    plain = build([], **BRANCHES)
    full = build(all_objectives(), **BRANCHES)
    assert list(full.objectives) == ["lmvsd", "vmlsd", *ALL_OBJECTIVES]
    data = batch()
    for seed in range(3):
        a, b = train_step(plain, data, seed=seed), train_step(full, data, seed=seed)
        for name in ("lmvsd", "vmlsd"):
            assert torch.equal(a.selections[name]["masked"], b.selections[name]["masked"])
            assert torch.equal(a.selections[name]["kept"], b.selections[name]["kept"])
        assert torch.equal(a.losses["seg"], b.losses["seg"])  # the main branch is untouched
    again = train_step(full, data, seed=2)
    assert torch.equal(again.selections["mask_grounding"]["masked"], b.selections["mask_grounding"]["masked"])
    draws = {tuple(train_step(full, data, seed=s).selections["mask_grounding"]["masked"].flatten().tolist())
             for s in range(6)}
    assert len(draws) > 1, "Mask Grounding's words should come from the generator"


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_objectives_train_every_parameter_and_eval_is_bit_identical(backend):
    build, batch = BACKENDS[backend]
    wrapper = build(all_objectives())
    images, ids, target = batch()
    out = train_step(wrapper, (images, ids, target))
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd", *ALL_OBJECTIVES}
    weights = {"seg": 1.0, "lmvsd": 0.75, "vmlsd": 0.1, "mask_grounding": 0.1, "cal": 0.1, "lang_rec": 0.1,
               "cal_fused": 0.1}
    torch.testing.assert_close(out.loss, sum(w * out.losses[k] for k, w in weights.items()))
    out.loss.backward()
    assert_all_grads(wrapper)
    bare_keys = set(wrapper.unwrap().state_dict())
    assert not any(k.startswith("objectives") for k in bare_keys)
    assert set(wrapper.state_dict()) == {"model." + k for k in bare_keys} | set(wrapper.added_state_dict())
    assert set(wrapper.added_parameters()) <= set(wrapper.added_state_dict())
    wrapper.eval()
    with torch.no_grad():
        assert torch.equal(wrapper(images, ids), wrapper.unwrap()(images, ids))
    reference = build([])  # the same bare weights without objectives
    reference.unwrap().load_state_dict(wrapper.unwrap().state_dict())
    reference.eval()
    with torch.no_grad():
        assert torch.equal(reference(images, ids), wrapper(images, ids))


def test_added_state_round_trip_with_all_objectives():
    first, second = towers_wrapper(all_objectives(seed=1)), towers_wrapper(all_objectives(seed=2))
    second.load_added_state_dict(first.added_state_dict())
    for key, value in first.added_state_dict().items():
        assert torch.equal(second.added_state_dict()[key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_to_supervise_still_reaches_every_added_parameter(backend):
    """Empty masks (no alignment sample, no mask centre) and, for towers, sentences without a word."""
    build, batch = BACKENDS[backend]
    wrapper = build(all_objectives())
    images, ids, target = batch()
    if backend == "towers":
        ids = torch.zeros_like(ids)
        ids[:, :2] = torch.tensor([SOT, EOT])
    out = train_step(wrapper, (images, ids, torch.zeros_like(target)))
    assert not out.selections["cal"]["valid"].any() and not out.selections["cal_fused"]["valid"].any()
    assert out.losses["cal"] == 0 and out.losses["cal_fused"] == 0
    if backend == "towers":
        assert out.losses["mask_grounding"] == 0 and out.losses["lang_rec"] == 0
    out.loss.backward()
    assert_all_grads(wrapper, prefix="objectives.")


def test_check_report_with_all_objectives_asks_for_no_unused_parameters():
    wrapper = hooks_wrapper(all_objectives())
    report = wrapper.check(*hooks_batch()[:2], target=hooks_batch()[2])
    assert report.no_grad == [] and not report.ddp_find_unused_parameters

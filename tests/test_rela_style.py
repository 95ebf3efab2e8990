"""A detectron2-style RIS model (ReLA / GRES) wrapped unchanged: list-of-dict inputs with the ids
inside the dicts, images padded by the model, a training forward that returns its loss dict,
two-class logits read from the head's output dict, eval outputs that are lists of dicts."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from ris_models import rela_style  # noqa: E402
from ris_models.specs import rela_spec, rela_words  # noqa: E402

import masksd  # noqa: E402
from masksd import HookSpec  # noqa: E402


def wrapped(seed: int = 0) -> masksd.MaskedSelfDistill:
    torch.manual_seed(seed)
    return masksd.wrap(rela_style.ReLAStyle(), rela_spec(), lmvsd=masksd.LMVSDConfig(top_k=0.5, ratio=0.5))


def test_spec_with_a_maskable_function_round_trips():
    spec = rela_spec()
    data = json.loads(json.dumps(spec.to_dict()))
    assert HookSpec.from_dict(data) == spec and HookSpec.from_dict(data).text.maskable.fn is rela_words


def test_main_branch_is_the_models_own_training_forward_and_its_loss_dict_the_seg_term():
    wrapper = wrapped()
    model, inputs = wrapper.unwrap(), rela_style.make_inputs()
    report = wrapper.check(inputs)
    assert report.fusion == "late" and not report.no_grad
    assert report.calls["masked image"].get("text_encoder", 0) == 0  # BERT reused in LMVSD
    assert report.calls["masked text"].get("backbone.res5", 0) == 0  # backbone reused in VMLSD
    torch.manual_seed(3)  # BERT's dropout draws from the global stream in both calls
    own = model.train()(inputs)
    torch.manual_seed(3)
    out = wrapper.train()(inputs, generator=torch.Generator().manual_seed(0))
    assert out.output.keys() == {"loss_mask", "loss_minimap", "loss_nt"}
    assert all(torch.equal(out.output[k], own[k]) for k in own)
    torch.testing.assert_close(out.losses["seg"], sum(own.values()).detach())  # loss="": the whole dict

    lmvsd, vmlsd = out.selections["lmvsd"], out.selections["vmlsd"]
    assert lmvsd["grid"] == (2, 2) and lmvsd["kept"].sum(1).tolist() == [2, 2, 2]  # res5 units over the stem
    words = rela_words({"batched_inputs": inputs})
    assert vmlsd["masked"].any() and not (vmlsd["masked"] & ~words).any()  # never [CLS]/[SEP]/padding
    out.loss.backward()
    assert wrapper.objectives["lmvsd"].mask_token.grad is not None
    assert wrapper.objectives["vmlsd"].mask_token.grad is not None


def test_eval_returns_the_models_per_image_dicts_bit_for_bit():
    wrapper = wrapped()
    fresh = rela_style.ReLAStyle()
    fresh.load_state_dict(wrapper.unwrap().state_dict(), strict=True)
    sizes = [(64, 48), (40, 64)]  # eval images keep their own sizes: the model pads them
    inputs = rela_style.make_inputs(batch_size=2)
    for sample, (h, w) in zip(inputs, sizes, strict=True):
        sample["image"] = sample["image"][:, :h, :w]
    with torch.no_grad():
        ours, theirs = wrapper.eval()(inputs), fresh.eval()(inputs)
    assert [o["ref_seg"].shape for o in ours] == [torch.Size(s) for s in sizes]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ours, theirs, strict=True) for k in a)


def test_a_loss_selector_that_finds_no_loss_names_the_keys():
    spec = rela_spec()
    bad = HookSpec.from_dict({**spec.to_dict(), "loss": "['loss_nt']"})  # a tensor: fine
    masksd.wrap(rela_style.ReLAStyle(), bad).train()(rela_style.make_inputs())
    worse = HookSpec.from_dict({**spec.to_dict(), "loss": "['missing']"})
    with pytest.raises(ValueError, match="HookSpec.loss"):
        masksd.wrap(rela_style.ReLAStyle(), worse).train()(rela_style.make_inputs())

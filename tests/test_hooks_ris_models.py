"""``masksd.wrap`` on models written the way RIS codebases write theirs (``tests/ris_models``).

The models are not restructured for masksd; each test wraps one with a spec (the recipes of
docs/wrapping.md), checks what the wrap-time check reports, trains a step, and checks that the
weights still load into the model's own class and that eval is the bare model bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from einops import rearrange
from ris_models.specs import cris_spec, lavt_spec, timm_spec  # noqa: F401 (re-exported)

import masksd
from masksd import HookSpec, Tap

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_unchanged_weights_and_eval(wrapper, model_cls, eval_args, **kwargs) -> None:
    bare = wrapper.unwrap()
    assert isinstance(bare, model_cls)
    fresh = model_cls(**kwargs)
    assert bare.state_dict().keys() == fresh.state_dict().keys()
    fresh.load_state_dict(bare.state_dict(), strict=True)
    wrapper.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(wrapper(*eval_args), fresh(*eval_args))


def test_cris_style_late_fusion_clip_resnet():
    from ris_models import cris_style

    torch.manual_seed(0)
    model = cris_style.CRIS()
    wrapper = masksd.wrap(model, cris_spec())
    batch = cris_style.make_batch()
    report = wrapper.check(batch.img, batch.word, batch.mask)
    assert report.fusion == "late"
    assert report.no_grad == ["model.backbone.logit_scale"]  # unused CLIP temperature: DDP advice
    assert report.ddp_find_unused_parameters
    assert report.calls["masked image"].get("backbone.transformer", 0) == 0  # text reused in LMVSD
    assert report.calls["masked text"].get("backbone.visual.layer4", 0) == 0  # image reused in VMLSD
    wrapper.train()
    out = wrapper(batch.img, batch.word, batch.mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.losses["seg"], out.output[2].detach())
    selection = out.selections["lmvsd"]
    assert selection["grid"] == (2, 2) and selection["kept"].sum(1).tolist() == [2] * 4  # units: C5 grid
    masked_words = out.selections["vmlsd"]["masked"]
    assert not (masked_words & ((batch.word == 0) | (batch.word >= 98))).any()
    out.loss.backward()
    assert wrapper.objectives["lmvsd"].mask_token.grad is not None
    _check_unchanged_weights_and_eval(wrapper, cris_style.CRIS, (batch.img, batch.word))


def test_cris_maskclip_dense_tokens_from_the_attention_pool_projections():
    """MaskCLIP on a CLIP ResNet: C5 ``layer4`` ``[B, 512, 2, 2]`` through the attention pool's
    value and output projections gives dense tokens ``[B, 4, 32]`` in CLIP's joint space."""
    from ris_models import cris_style

    pool = "backbone.visual.attnpool"
    image = dataclasses.replace(cris_spec().image, tokens=Tap(
        "backbone.visual.layer4", layout="bchw", project=(f"{pool}.v_proj", f"{pool}.c_proj")))
    spec = dataclasses.replace(cris_spec(), image=image)
    assert HookSpec.from_dict(spec.to_dict()) == spec
    torch.manual_seed(0)
    model = cris_style.CRIS()
    wrapper = masksd.wrap(model, spec, lmvsd=masksd.LMVSDConfig(top_k=0.5, ratio=0.5))
    seen = {}

    def record(name):
        def hook(module, args, output):
            run = wrapper.runner.recorder.run  # the run in progress
            if run is not None and run.label == "main":
                seen[name] = (args, output)
        return hook

    model.backbone.visual.layer4.register_forward_hook(record("layer4"))
    model.neck.register_forward_hook(record("neck"))
    batch = cris_style.make_batch()
    wrapper.train()
    out = wrapper(batch.img, batch.word, batch.mask, generator=torch.Generator().manual_seed(0))
    selection = out.selections["lmvsd"]
    assert selection["grid"] == (2, 2) and selection["kept"].shape == (4, 4)  # C5 units over a 16x16 stem
    with torch.no_grad():  # MaskCLIP by hand: v_proj then c_proj, scored against CRIS's sentence state
        c5 = rearrange(seen["layer4"][1], "b c h w -> b (h w) c")
        dense = model.backbone.visual.attnpool.c_proj(model.backbone.visual.attnpool.v_proj(c5))
        scores = torch.einsum("bd,bnd->bn", seen["neck"][0][1], dense)
    assert dense.shape == (4, 4, 32)
    expected = torch.zeros(4, 4, dtype=torch.bool).scatter_(1, scores.topk(2, dim=1).indices, True)
    assert torch.equal(selection["kept"], expected)
    assert selection["masked"].sum(1).tolist() == [1] * 4 and not (selection["masked"] & ~expected).any()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert wrapper.objectives["lmvsd"].mask_token.grad is not None
    _check_unchanged_weights_and_eval(wrapper, cris_style.CRIS, (batch.img, batch.word))


def test_lavt_style_early_fusion_bert():
    pytest.importorskip("transformers")
    from ris_models import lavt_style

    torch.manual_seed(0)
    model = lavt_style.LAVTOne()
    wrapper = masksd.wrap(model, lavt_spec())
    mask_row = model.text_encoder.embeddings.word_embeddings.weight[4]
    assert torch.equal(wrapper.objectives["vmlsd"].mask_token, mask_row)
    batch = lavt_style.make_batch()
    report = wrapper.check(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)
    assert report.fusion == "text->image"
    assert report.passes["vmlsd"] == "full forward"  # masking words changes the image features
    assert "text_encoder" in report.passes["lmvsd"]
    assert report.calls["masked text"]["backbone.layers.2"] == 1
    assert report.no_grad == []
    wrapper.train()
    out = wrapper(batch.image, batch.input_ids, batch.attention_mask, target=batch.target,
                  generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (4, 1, 64, 64)
    # masksd's BCE on x1 - x0 is the two-class cross-entropy
    ce = torch.nn.functional.cross_entropy(out.output, batch.target)
    torch.testing.assert_close(out.losses["seg"], ce.detach())
    words = out.selections["vmlsd"]["masked"]
    special = (batch.input_ids == 2) | (batch.input_ids == 3) | (batch.attention_mask == 0)
    assert not (words & special).any()
    assert out.selections["lmvsd"]["grid"] == (4, 4)  # stage-3 units over the 16x16 patch grid
    out.loss.backward()
    _check_unchanged_weights_and_eval(wrapper, lavt_style.LAVTOne,
                                      (batch.image, batch.input_ids, batch.attention_mask))


def test_timm_vit_with_text_transformer():
    from ris_models import timm_style

    torch.manual_seed(0)
    wrapper = masksd.wrap(timm_style.TimmRIS(), timm_spec())
    batch = timm_style.make_batch()
    report = wrapper.check(batch.images, batch.ids, target=batch.mask)
    assert report.fusion == "late" and report.no_grad == []
    assert report.calls["masked text"].get("image_encoder.blocks", 0) == 0
    wrapper.train()
    out = wrapper(batch.images, batch.ids, target=batch.mask, generator=torch.Generator().manual_seed(0))
    assert out.selections["lmvsd"]["kept"].shape == (4, 64) and out.selections["lmvsd"]["grid"] == (8, 8)
    out.loss.backward()
    _check_unchanged_weights_and_eval(wrapper, timm_style.TimmRIS, (batch.images, batch.ids))

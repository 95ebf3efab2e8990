"""Dense scoring on the hook path for a model built on transformers' ``CLIPModel``.

The model is written the way an RIS codebase writes one (its own forward over ``clip.vision_model`` /
``clip.text_model``, no masksd types); ``clip_dense_tap`` gives LMVSD the MaskCLIP / ClearCLIP
patch features, checked against the hand computation in ``hf_clip_models.dense_reference``.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_clip_models import (  # noqa: E402
    PLAIN_TOKENS,
    HFClipRIS,
    dense_reference,
    images,
    spec_for,
    text_features,
    tiny_clip,
    tokenized,
)

import masksd  # noqa: E402
from masksd import HookSpec, LMVSDConfig, Tap, VMLSDConfig  # noqa: E402
from masksd.adapters.clip_dense import clip_dense_tap, dense_step  # noqa: E402
from masksd.masking import select_top_k  # noqa: E402


@pytest.mark.parametrize("mode", ["value", "clearclip"])
def test_a_dense_tap_on_a_hf_clip_model_selects_by_the_dense_features(mode):
    torch.manual_seed(1)
    model = HFClipRIS(tiny_clip())
    tap = clip_dense_tap(model, "clip", mode=mode)
    last = "clip.vision_model.encoder.layers.1"
    assert tap == Tap(last, kind="input", select="[0]",
                      project=(dense_step(mode, last), "clip.vision_model.post_layernorm",
                               "clip.visual_projection"))
    # the vision transformer's own path, with its projection named, gives the same tap
    assert clip_dense_tap(model, "clip.vision_model", mode=mode, projection="clip.visual_projection") == tap
    spec = spec_for(model, tap)
    assert HookSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec

    x, batch = images(3), tokenized()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    kept = {}
    for name, image_tokens in (("dense", tap), ("plain", PLAIN_TOKENS)):
        wrapped = masksd.wrap(model, spec_for(model, image_tokens), lmvsd=LMVSDConfig(top_k=0.5),
                              vmlsd=VMLSDConfig(top_k=0.5))
        with torch.no_grad():
            assert torch.equal(wrapped.eval()(x, ids, mask), model.eval()(x, ids, mask))
            out = wrapped.train()(x, ids, mask, target=target, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss)
        kept[name] = out.selections["lmvsd"]["kept"]
    with torch.no_grad():
        scores = torch.einsum("bd,bnd->bn", text_features(model.clip, ids, mask),
                              dense_reference(model.clip, x, mode))
    assert torch.equal(kept["dense"],
                       select_top_k(scores, torch.ones_like(scores, dtype=torch.bool), top_k=0.5))
    assert not torch.equal(kept["dense"], kept["plain"])


def test_dense_tap_errors_name_the_fix():
    model = HFClipRIS(tiny_clip())
    with pytest.raises(ValueError, match="joint space lives outside it: pass the path of the CLIPModel"):
        clip_dense_tap(model, "clip.vision_model")
    with pytest.raises(ValueError, match="projection='clip.nothing' is neither a module nor a tensor"):
        clip_dense_tap(model, "clip", projection="clip.nothing")
    with pytest.raises(ValueError, match="'clip.text_model' .* is not a CLIP ViT"):
        clip_dense_tap(model, "clip.text_model")
    delattr(model.clip.vision_model.encoder.layers[-1], "layer_norm1")
    with pytest.raises(ValueError, match=r"layers\.1: dense scoring features need a transformers "
                                         "CLIPEncoderLayer; its CLIPEncoderLayer lacks layer_norm1"):
        clip_dense_tap(model, "clip")

"""masksd beside PEFT's LoRA on a model built on a Hugging Face ``CLIPModel`` (docs/integrations.md):
the main branch is PEFT's own forward, gradients reach what PEFT leaves trainable, the adapters load
back with PEFT's own code, and dense scoring reads the adapted projections (or refuses a packed
attention it cannot read)."""

from __future__ import annotations

import copy

import pytest
import torch

import masksd
from masksd import LMVSDConfig, VMLSDConfig
from masksd.masking import select_top_k

peft = pytest.importorskip("peft")
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

from masksd.adapters.clip_dense import clip_dense_tap  # noqa: E402

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
            modules_to_save=["patch_in", "sentence_in", "head"])


def lora_model(dropout: float = 0.0, **changes) -> peft.PeftModel:
    torch.manual_seed(1)
    return peft.get_peft_model(HFClipRIS(tiny_clip()),
                               peft.LoraConfig(lora_dropout=dropout, **{**LORA, **changes}))


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = tokenized()
    target = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    return images(3), batch["input_ids"], batch["attention_mask"], target


def test_lora_model_wraps_by_its_base_model_trains_the_adapters_and_loads_back_with_peft(tmp_path):
    peft_model = lora_model(dropout=0.1)
    inner = peft_model.get_base_model()  # LoRA layers sit inside it: the spec's paths are the model's own
    wrapper = masksd.wrap(inner, spec_for(inner, PLAIN_TOKENS))
    x, ids, mask, target = inputs()
    with torch.no_grad():
        assert torch.equal(wrapper.eval()(x, ids, mask), peft_model.eval()(x, ids, mask))
        torch.manual_seed(5)
        own = peft_model.train()(x, ids, mask)  # LoRA dropout draws from the global RNG
        torch.manual_seed(5)
        out = wrapper.train()(x, ids, mask, target=target)
    assert torch.equal(out.output, own)  # the main branch is PEFT's own training forward

    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        out = wrapper.train()(x, ids, mask, target=target)
        out.loss.backward()
        assert all(p.grad is not None for n, p in wrapper.named_parameters()
                   if "lora_" in n or "mask_token" in n)
        # frozen by PEFT
        assert all(p.grad is None for n, p in inner.clip.named_parameters() if "lora_" not in n)
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(inner.clip.vision_model.encoder.layers[-1].self_attn.q_proj.lora_B.default.weight,
                           torch.zeros(32, 4))

    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = peft.PeftModel.from_pretrained(HFClipRIS(tiny_clip()), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, ids, mask), wrapper.eval()(x, ids, mask))


def test_dense_tap_reads_the_lora_adapted_projections_without_their_dropout():
    # adapters (with dropout) on the last vision layer only: its input and the sentence feature stay
    # deterministic, so any noise in the selection would come from the scoring projections
    peft_model = lora_model(dropout=0.5,
                            target_modules=r".*vision_model\.encoder\.layers\.1\.self_attn\.(q_proj|v_proj)")
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it change the projections
            torch.nn.init.normal_(param, std=0.5, generator=torch.Generator().manual_seed(3))
    inner = peft_model.get_base_model()
    wrapper = masksd.wrap(inner, spec_for(inner, clip_dense_tap(inner, "clip", mode="clearclip")),
                          lmvsd=LMVSDConfig(top_k=0.5), vmlsd=VMLSDConfig(top_k=0.5))
    x, ids, mask, target = inputs()
    with torch.no_grad():
        out = wrapper.train()(x, ids, mask, target=target, generator=torch.Generator().manual_seed(0))
        merged = copy.deepcopy(peft_model).merge_and_unload().clip.eval()  # LoRA folded into the weights
        dense = dense_reference(merged, x, "clearclip")
        scores = torch.einsum("bd,bnd->bn", text_features(merged, ids, mask), dense)
        with peft_model.disable_adapter():
            without_lora = dense_reference(inner.clip.eval(), x, "clearclip")
    assert not torch.allclose(without_lora, dense, atol=1e-3)  # the adapters change the dense features
    # kept: the top half under the adapted projections with LoRA's dropout off (p = 0.5 would scramble it)
    assert torch.equal(out.selections["lmvsd"]["kept"],
                       select_top_k(scores, torch.ones_like(scores, dtype=torch.bool), top_k=0.5))
    assert torch.isfinite(out.loss)


def test_dense_scoring_refuses_an_adapter_wrapped_packed_attention():
    open_clip = pytest.importorskip("open_clip")
    from masksd.adapters.open_clip import towers_from_open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=24,
                          vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                          text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1))
    peft.get_peft_model(clip, peft.LoraConfig(r=4, target_modules=["attn"]))  # LoRA on nn.MultiheadAttention
    # its packed in_proj_weight is the base layer's: scoring with it would silently miss the adapter
    with pytest.raises(ValueError, match="wrapped by an adapter .*Score with the plain patch tokens"):
        towers_from_open_clip(clip, dense="value")
    with pytest.raises(ValueError, match="wrapped by an adapter"):
        clip_dense_tap(clip, "visual")
    towers_from_open_clip(clip)  # the plain tokens do not read the weights

"""masksd beside the training add-ons RIS users combine it with: PEFT's LoRA, weight averaging (EMA),
and Hugging Face Accelerate. Each test uses the add-on's own public API on a model written
without masksd in mind, and checks what a user relies on: the main branch is the add-on's own
forward, gradients reach what the add-on leaves trainable, and the weights load back with the
add-on's own code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hook_models import TinyRIS, make_batch, tiny_spec
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.optim.swa_utils import AveragedModel

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

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["patch_in", "sentence_in", "head"])


def lora_model(dropout: float = 0.0, **changes) -> peft.PeftModel:
    torch.manual_seed(1)
    return peft.get_peft_model(HFClipRIS(tiny_clip()), peft.LoraConfig(lora_dropout=dropout, **{**LORA, **changes}))


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
        assert all(p.grad is not None for n, p in wrapper.named_parameters() if "lora_" in n or "mask_token" in n)
        assert all(p.grad is None for n, p in inner.clip.named_parameters() if "lora_" not in n)  # frozen by PEFT
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
    peft_model = lora_model(dropout=0.5, target_modules=r".*vision_model\.encoder\.layers\.1\.self_attn\.(q_proj|v_proj)")
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
    assert torch.equal(out.selections["lmvsd"]["kept"], select_top_k(scores, torch.ones_like(scores, dtype=torch.bool),
                                                                     top_k=0.5))
    assert torch.isfinite(out.loss)


def test_weight_averaging_copies_of_a_hooked_model_stay_the_bare_model():
    timm_utils = pytest.importorskip("timm.utils")
    torch.manual_seed(0)
    model = TinyRIS()
    wrapper = masksd.wrap(model, tiny_spec())
    averages = [AveragedModel(model), timm_utils.ModelEmaV3(model, decay=0.5)]  # both deep-copy the model
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    images_, ids, masks = make_batch()
    for _ in range(3):
        wrapper.train()(images_, ids, target=masks).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        averages[0].update_parameters(model)
        averages[1].update(model)
    for average in averages:
        assert set(average.module.state_dict()) == set(model.state_dict())  # no mask tokens
        assert not torch.equal(average.module.decoder.weight, model.decoder.weight)
        clean = TinyRIS()
        clean.load_state_dict(average.module.state_dict())
        with torch.no_grad():
            for mode in (False, True):  # the copied hooks are inert outside the wrapper's step
                assert torch.equal(average.module.train(mode)(images_, ids), clean.train(mode)(images_, ids))


def test_accelerate_prepared_wrapper_trains_under_its_autocast_and_unwraps_to_the_bare_model():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = TinyRIS()
    wrapper = masksd.wrap(model, tiny_spec())
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    prepared, optimizer = accelerator.prepare(wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1))
    images_, ids, masks = make_batch()
    before = model.decoder.weight.detach().clone()
    out = prepared.train()(images_, ids, target=masks)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32  # masksd's losses stay fp32
    accelerator.backward(out.loss)
    assert wrapper.added_parameters()["objectives.lmvsd.mask_token"].grad is not None
    optimizer.step()
    assert not torch.equal(model.decoder.weight, before)
    bare = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False).unwrap()
    assert bare is model
    clean = TinyRIS()
    clean.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(bare.eval()(images_, ids), clean.eval()(images_, ids))


def test_lightning_module_holding_the_wrapper_trains_and_its_checkpoint_loads_into_the_bare_model(tmp_path):
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import WeightAveraging

    class LitRIS(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.wrapper = masksd.wrap(TinyRIS(), tiny_spec())

        def training_step(self, batch, batch_idx):
            images_, ids, masks = batch
            out = self.wrapper(images_, ids, target=masks)
            self.log_dict({f"train/{name}": value for name, value in out.losses.items()})
            return out.loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    images_, ids, masks = make_batch()
    data = torch.utils.data.DataLoader(list(zip(images_, ids, masks, strict=True)), batch_size=2)
    lit = LitRIS()
    token = lit.wrapper.added_parameters()["objectives.lmvsd.mask_token"].detach().clone()
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                callbacks=[WeightAveraging()])  # deep-copies the module, hooks and all
    trainer.fit(lit, data)
    assert {"train/seg", "train/lmvsd", "train/vmlsd"} <= set(trainer.callback_metrics)
    assert not torch.equal(lit.wrapper.added_parameters()["objectives.lmvsd.mask_token"], token)

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    with pytest.raises(ValueError, match="starts with 'wrapper.'"):
        masksd.load_bare_state_dict(TinyRIS(), state)
    consume_prefix_in_state_dict_if_present(state, "wrapper.")
    bare = TinyRIS()
    masksd.load_bare_state_dict(bare, state)
    with torch.no_grad():
        assert torch.equal(bare.eval()(images_, ids), lit.wrapper.eval()(images_, ids))


def test_dense_scoring_refuses_an_adapter_wrapped_packed_attention():
    open_clip = pytest.importorskip("open_clip")
    from masksd.adapters.open_clip import towers_from_open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                          text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1))
    peft.get_peft_model(clip, peft.LoraConfig(r=4, target_modules=["attn"]))  # LoRA on nn.MultiheadAttention
    # its packed in_proj_weight is the base layer's: scoring with it would silently miss the adapter
    with pytest.raises(ValueError, match="wrapped by an adapter .*Score with the plain patch tokens"):
        towers_from_open_clip(clip, dense="value")
    with pytest.raises(ValueError, match="wrapped by an adapter"):
        clip_dense_tap(clip, "visual")
    towers_from_open_clip(clip)  # the plain tokens do not read the weights


def test_mmengine_model_returns_the_weighted_total_as_its_one_loss_key():
    pytest.importorskip("mmengine")
    from mmengine.model import BaseModel
    from mmengine.optim import OptimWrapper

    class MMRIS(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.wrapper = masksd.wrap(TinyRIS(), tiny_spec(), lmvsd=LMVSDConfig(weight=0.75))

        def forward(self, images, ids, masks=None, mode="tensor"):
            if mode == "loss":  # parse_losses sums every key containing "loss": one, the weighted total
                out = self.wrapper(images, ids, target=masks)
                return {"loss": out.loss, **out.losses}  # the unweighted terms are logged, not summed
            return self.wrapper.unwrap()(images, ids)

    torch.manual_seed(0)
    model = MMRIS()
    images_, ids, masks = make_batch()
    before = model.wrapper.unwrap().decoder.weight.detach().clone()
    torch.manual_seed(1)
    expected = model.wrapper.train()(images_, ids, target=masks)
    torch.manual_seed(1)
    log = model.train().train_step({"images": images_, "ids": ids, "masks": masks},
                                   OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)))
    assert set(log) == {"loss", "seg", "lmvsd", "vmlsd"}
    torch.testing.assert_close(log["loss"], expected.loss.detach())
    assert not torch.allclose(log["loss"], log["seg"] + log["lmvsd"] + log["vmlsd"])  # the weights matter
    assert not torch.equal(model.wrapper.unwrap().decoder.weight, before)

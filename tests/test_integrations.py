"""masksd beside the training engines and add-ons RIS users combine it with: weight averaging (EMA),
Hugging Face Accelerate, Lightning and mmengine (docs/integrations.md; PEFT LoRA: test_peft_lora.py).
Each test uses the add-on's own public API on a model written without masksd in mind and checks
what a user relies on: what trains, what is logged, and that the weights load back with the
user's own code.
"""

from __future__ import annotations

import pytest
import torch
from hook_models import TinyRIS, make_batch, tiny_spec
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.optim.swa_utils import AveragedModel

import masksd
from masksd import LMVSDConfig


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
                                enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=tmp_path,
                                callbacks=[WeightAveraging()])  # deep-copies the module, hooks and all
    trainer.fit(lit, data)
    assert {"train/seg", "train/lmvsd", "train/vmlsd"} <= set(trainer.callback_metrics)
    assert not torch.equal(lit.wrapper.added_parameters()["objectives.lmvsd.mask_token"], token)

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    with pytest.raises(ValueError, match="starts with 'wrapper.'"):
        masksd.checkpoints.load_bare_state_dict(TinyRIS(), state)
    consume_prefix_in_state_dict_if_present(state, "wrapper.")
    bare = TinyRIS()
    masksd.checkpoints.load_bare_state_dict(bare, state)
    with torch.no_grad():
        assert torch.equal(bare.eval()(images_, ids), lit.wrapper.eval()(images_, ids))


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

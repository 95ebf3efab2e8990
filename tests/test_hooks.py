"""``masksd.wrap``: unchanged models driven through hooks (see ``hook_models.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hook_models import (
    EarlyFusionRIS,
    LossReturningRIS,
    TinyRIS,
    early_spec,
    make_batch,
    tiny_spec,
)
from torch import nn

import masksd
from masksd import HookSpec, LMVSDConfig, ModalitySpec, Output, Tap, VMLSDConfig
from masksd.engine.outputs import as_tensor_loss


def wrapped(model_cls=TinyRIS, spec=None, seed: int = 0, **options) -> masksd.MaskedSelfDistill:
    torch.manual_seed(seed)
    model = model_cls()
    return masksd.wrap(model, spec if spec is not None else tiny_spec(), **options)


def train_step(wrapper, data=None, seed: int = 0, **kwargs):
    images, ids, masks = data if data is not None else make_batch()
    wrapper.train()
    return wrapper(images, ids, target=masks, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_state_dict_keys_untouched_and_strict_load_into_users_class():
    wrapper = wrapped()
    out = train_step(wrapper)
    out.loss.backward()
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd"}
    assert wrapper.unwrap().state_dict().keys() == TinyRIS().state_dict().keys()
    assert set(wrapper.state_dict()) == ({"model." + k for k in TinyRIS().state_dict()}
                                         | set(wrapper.added_state_dict()))
    assert set(wrapper.added_state_dict()) == {"objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"}
    fresh = TinyRIS()
    fresh.load_state_dict(wrapper.unwrap().state_dict(), strict=True)
    images, ids, _ = make_batch()
    wrapper.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(images, ids), wrapper(images, ids))
        assert torch.equal(wrapper.unwrap()(images, ids), wrapper(images, ids))
    assert isinstance(wrapper.unwrap(), TinyRIS)


def test_added_state_round_trip():
    wrapper, other = wrapped(seed=0), wrapped(seed=1)
    other.load_added_state_dict(wrapper.added_state_dict())
    assert torch.equal(other.objectives["lmvsd"].mask_token, wrapper.objectives["lmvsd"].mask_token)
    with pytest.raises(RuntimeError):
        other.load_added_state_dict({"objectives.nope": torch.zeros(1)})


def test_every_parameter_gets_a_gradient_and_check_reports_late_fusion():
    wrapper = wrapped()
    images, ids, masks = make_batch()
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    report = wrapper.check(images, ids, target=masks)
    assert report.backend == "hooks" and report.fusion == "late"
    assert report.no_grad == [] and not report.ddp_find_unused_parameters
    assert "skips ['text_encoder']" in report.passes["lmvsd"]
    assert "skips ['backbone']" in report.passes["vmlsd"]
    # the masked-image branch does not re-run the text encoder, the masked-text branch not the backbone
    assert report.calls["masked image"].get("text_encoder", 0) == 0
    assert report.replayed["masked image"]["text_encoder"] == 1
    assert report.calls["masked text"].get("backbone", 0) == 0
    assert report.calls["main"]["text_encoder"] == 1 and report.calls["main"]["backbone"] == 1
    assert "find_unused_parameters=False" in str(report)
    for key, value in wrapper.state_dict().items():  # check() leaves the model as it was
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in wrapper.parameters())


@pytest.mark.parametrize("vmlsd, expected", [(None, 1), (True, 2)], ids=["lmvsd_only", "both"])
def test_text_encoder_runs_in_main_and_vmlsd_only(vmlsd, expected):
    wrapper = wrapped(vmlsd=vmlsd)
    calls = []  # the encoder's inner layer runs only when the encoder really runs (not replayed)
    wrapper.unwrap().text_encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    train_step(wrapper)  # includes the one-off fusion probe
    calls.clear()
    train_step(wrapper)
    assert len(calls) == expected  # LMVSD reuses the main branch's text features


def test_cnn_units_are_solid_blocks_on_the_embedding_grid():
    wrapper = wrapped(lmvsd=LMVSDConfig(top_k=1.0, ratio=0.5))
    seen = {}
    embed = wrapper.unwrap().patch_embed

    def record(module, args, output):
        run = wrapper.runner.recorder.run  # the run in progress
        if run is not None and run.label == "masked image":
            seen["masked"] = output.detach()

    embed.register_forward_hook(record)  # registered after masksd's: sees the replaced output
    out = train_step(wrapper)
    selection = out.selections["lmvsd"]
    assert selection["grid"] == (4, 4) and selection["masked"].shape == (4, 16)
    token = wrapper.objectives["lmvsd"].mask_token.detach()
    is_token = (seen["masked"] == token[None, :, None, None]).all(dim=1)  # [B, 8, 8]
    units = selection["masked"].view(4, 4, 4)
    expected = units.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(is_token, expected)
    assert int(units.sum()) == 4 * 8  # half of 16 units per sample


def test_early_fusion_is_probed_and_vmlsd_runs_a_full_forward():
    wrapper = wrapped(EarlyFusionRIS, early_spec())
    images, ids, masks = make_batch()
    report = wrapper.check(images, ids, target=masks)
    assert report.fusion == "text->image"
    assert report.passes["vmlsd"] == "full forward"
    assert "text_encoder" in report.passes["lmvsd"]
    assert report.calls["masked text"]["stage2"] == 1
    out = train_step(wrapper)
    assert out.logits.shape == (4, 1, 32, 32) and torch.isfinite(out.loss)
    # two-class logits became x1 - x0
    wrapper.eval()
    with torch.no_grad():
        two = wrapper(images, ids)
    assert two.shape == (4, 2, 32, 32)
    declared = wrapped(EarlyFusionRIS, early_spec(fusion="late"))
    assert "skips" in declared.describe()["passes"]["vmlsd"]  # the user overrides the probe


def test_early_fusion_probe_catches_a_wrong_reuse_declaration():
    wrapper = wrapped(EarlyFusionRIS, early_spec())
    train_step(wrapper)
    assert wrapper.describe()["depends"] == {"image": True, "text": False}


def test_loss_returning_model_with_target_argument_and_module_tap():
    spec = tiny_spec(logits=Tap("decoder"), target="mask", loss="[2]")
    wrapper = wrapped(LossReturningRIS, spec)
    images, ids, masks = make_batch()
    out = wrapper.train()(images, ids, masks, generator=torch.Generator().manual_seed(0))
    pred, returned_mask, model_loss = out.output
    assert returned_mask is masks
    torch.testing.assert_close(out.losses["seg"], model_loss.detach())
    out.loss.backward()
    assert wrapper.objectives["lmvsd"].mask_token.grad is not None
    wrapper.eval()
    with torch.no_grad():
        assert torch.equal(wrapper(images, ids), wrapper.unwrap()(images, ids))


class DictLossRIS(TinyRIS):
    """mmseg-style: the training forward returns the prediction and a dict of losses *and* metrics."""

    names = ("loss_bce", "acc_seg")

    def forward(self, img, ids, mask=None):  # type: ignore[override]
        pred = super().forward(img, ids)
        if not self.training:
            return pred
        target = F.interpolate(mask[:, None].float(), size=pred.shape[-2:], mode="nearest")
        bce = F.binary_cross_entropy_with_logits(pred, target)
        accuracy = ((pred > 0) == (target > 0.5)).float().mean() * 100  # a metric, not a loss
        return {"pred": pred, "losses": dict(zip(self.names, (bce, accuracy.detach())))}


def test_loss_dict_sums_only_the_entries_named_loss():
    spec = tiny_spec(logits=Output(select="['pred']"), target="mask", loss="['losses']")
    wrapper = wrapped(DictLossRIS, spec)
    images, ids, masks = make_batch()
    out = wrapper.train()(images, ids, masks, generator=torch.Generator().manual_seed(0))
    losses = out.output["losses"]
    assert float(losses["acc_seg"]) > 1.0  # a sum would be dominated by the accuracy
    torch.testing.assert_close(out.losses["seg"], losses["loss_bce"].detach())
    out.loss.backward()
    assert wrapper.unwrap().decoder.weight.grad is not None

    class MetricsOnly(DictLossRIS):
        names = ("bce", "acc_seg")

    with pytest.raises(ValueError, match=r"no loss entry.*\['bce'\].*\['acc_seg'\].*HookSpec\(loss="):
        wrapped(MetricsOnly, spec).train()(images, ids, masks)


def test_as_tensor_loss_follows_mmseg_parse_losses():
    a, b, m = torch.tensor(1.0), torch.tensor([2.0, 4.0]), torch.tensor(50.0)
    assert float(as_tensor_loss({"loss_ce": a, "loss_dice": b, "acc_seg": m}, "x")) == 4.0  # b averaged
    assert float(as_tensor_loss({"decode": {"loss_ce": a, "acc_seg": m}, "aux": {"loss_ce": a}}, "x")) == 2.0
    # unnamed inside: whole
    assert float(as_tensor_loss({"loss": {"ce": a, "dice": a}, "acc": m}, "x")) == 2.0
    assert float(as_tensor_loss({"losses": {"loss_bce": a, "acc_seg": m}}, "x")) == 1.0
    assert float(as_tensor_loss({"loss_aux": [a, a, a], "pred": m}, "x")) == 3.0  # lists summed
    assert float(as_tensor_loss(a, "x")) == 1.0
    with pytest.raises(ValueError, match=r"no loss entry.*\['acc_seg'\]"):
        as_tensor_loss({"acc_seg": m}, "HookSpec.loss")
    with pytest.raises(ValueError, match="scalar loss.*shape \\(2,\\)"):
        as_tensor_loss(b, "HookSpec.loss")


def test_detached_output_logits_are_refused():
    wrapper = wrapped(LossReturningRIS, tiny_spec(logits=Output(select="[0]"), target="mask", loss="[2]"))
    images, ids, masks = make_batch()
    with pytest.raises(ValueError, match="no gradient.*Tap"):
        wrapper.train()(images, ids, masks)


def test_two_class_logits_without_flag_are_refused():
    wrapper = wrapped(EarlyFusionRIS, early_spec(two_class=False))
    with pytest.raises(ValueError, match="two_class=True"):
        train_step(wrapper)


def test_in_place_change_of_the_embedding_output_is_detected():
    class InplaceRIS(TinyRIS):
        def forward(self, img, ids):
            x = self.patch_embed(img)
            x.relu_()  # modifies the hooked output in place
            w = self.text_encoder(self.word_embed(ids))
            return self.decoder(self.backbone(x) * w.mean(1)[:, :, None, None])

    wrapper = wrapped(InplaceRIS)
    with pytest.raises(ValueError, match="modified in place"):
        train_step(wrapper)


def test_refuses_wrapped_models_and_bad_paths():
    model = TinyRIS()
    with pytest.raises(TypeError, match="wrap the bare model first"):
        masksd.wrap(nn.DataParallel(model), tiny_spec())
    with pytest.raises(TypeError, match="wrap the bare model first"):
        masksd.wrap(torch.compile(model), tiny_spec())
    bad = tiny_spec(image=ModalitySpec(embed="patch_embd", layout="bchw"))
    with pytest.raises(ValueError, match="no module 'patch_embd'.*patch_embed"):
        masksd.wrap(model, bad, lmvsd=LMVSDConfig(scorer="random"))
    with pytest.raises(ValueError, match="scorer='correlation'.*tokens"):
        masksd.wrap(model, tiny_spec(image=ModalitySpec(embed="patch_embed", layout="bchw")))


def test_prediction_and_random_scorers_need_no_shared_space():
    spec = tiny_spec(image=ModalitySpec(embed="patch_embed", layout="bchw"))
    wrapper = wrapped(spec=spec, lmvsd=LMVSDConfig(scorer="prediction", top_k=0.25),
                      vmlsd=VMLSDConfig(scorer="random"))
    out = train_step(wrapper)
    kept = out.selections["lmvsd"]["kept"]
    assert kept.shape == (4, 64) and kept.sum(1).tolist() == [16] * 4
    probability = torch.sigmoid(out.logits.detach())  # [4, 1, 4, 4] over an 8x8 embedding grid
    pooled = nn.functional.adaptive_avg_pool2d(probability, (8, 8)).flatten(1)
    assert torch.equal(kept, pooled >= pooled.topk(16, dim=1).values[:, -1:])


def test_mask_token_initialisations():
    zero = wrapped(spec=tiny_spec(text=ModalitySpec(
        embed="word_embed", mask_token="embedding:word_embed:3", tokens=Tap("text_encoder"))))
    assert torch.equal(zero.objectives["vmlsd"].mask_token, zero.unwrap().word_embed.weight[3])
    image_zero = tiny_spec(image=ModalitySpec(embed="patch_embed", layout="bchw", mask_token="zero",
                                              tokens=Tap("backbone", layout="bchw")))
    assert not wrapped(spec=image_zero).objectives["lmvsd"].mask_token.any()


def test_spec_serialises_and_selectors_are_safe():
    spec = early_spec(target="mask", loss="['loss']")
    assert HookSpec.from_dict(spec.to_dict()) == spec
    for bad in ("[__import__('os')]", ".__class__", "(1)"):
        with pytest.raises(ValueError, match="select"):
            Output(select=bad)
    with pytest.raises(ValueError, match="lambda"):
        tiny_spec(image=ModalitySpec(embed="patch_embed", maskable=masksd.Maskable(fn=lambda a: a))).to_dict()


def test_syncbatchnorm_after_wrapping_keeps_main_branch_statistics():
    wrapper = nn.SyncBatchNorm.convert_sync_batchnorm(wrapped(EarlyFusionRIS, early_spec()))
    norms = [m for m in wrapper.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(norms) == 2
    reference = copy.deepcopy(wrapper.unwrap()).train()
    images, ids, masks = make_batch()
    train_step(wrapper, (images, ids, masks))
    with torch.no_grad():
        reference(images, ids)  # one plain forward: what the running statistics must describe
    for mine, theirs in zip(norms, [m for m in reference.modules() if isinstance(m, nn.SyncBatchNorm)]):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        assert int(mine.num_batches_tracked) == 1


def test_dataparallel_replica_is_refused():
    # nn.DataParallel's replicate() makes each copy with this call (torch.nn.parallel.replicate
    # itself needs devices): if torch renames its replica marker, this test fails instead of users
    replica = wrapped()._replicate_for_data_parallel()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        train_step(replica)


def test_private_decoders_for_a_hooked_model_train_apart_from_the_shared_one():
    """``share_decoder=False`` (paper Table VII) on a hooked model: ``HookSpec(decoder=...)`` names the
    module; each branch's copy runs in its branch only, and the user's keys stay the user's."""
    with pytest.raises(ValueError, match=r"HookSpec\(decoder='<module path>'\)"):
        wrapped(share_decoder=False)
    wrapper = wrapped(spec=tiny_spec(decoder="decoder"), share_decoder=False)
    model = wrapper.unwrap()
    assert model.state_dict().keys() == TinyRIS().state_dict().keys()
    private = {name: wrapper.objectives[name].decoder for name in ("lmvsd", "vmlsd")}
    assert all(d is not model.decoder and torch.equal(d.weight, model.decoder.weight)
               for d in private.values())
    calls = {name: 0 for name in ("shared", "lmvsd", "vmlsd")}
    model.decoder.register_forward_hook(lambda *_: calls.__setitem__("shared", calls["shared"] + 1))
    for name, module in private.items():
        module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    train_step(wrapper)  # includes the one-off fusion probe (a forward of the shared decoder)
    calls.update(shared=0, lmvsd=0, vmlsd=0)
    out = train_step(wrapper)
    assert calls == {"shared": 1, "lmvsd": 1, "vmlsd": 1}
    out.loss.backward()
    assert all(d.weight.grad is not None for d in private.values())  # both in the graph
    assert private["lmvsd"].weight.grad.abs().sum() > 0  # (VMLSD may mask no word: then its copy's
    assert model.decoder.weight.grad is not None          #  logits equal the main's and its gradient is 0)
    assert "objectives.lmvsd.decoder.weight" in wrapper.state_dict()
    wrapper.eval()
    images, ids, _ = make_batch()
    with torch.no_grad():
        assert torch.equal(wrapper(images, ids), model(images, ids))

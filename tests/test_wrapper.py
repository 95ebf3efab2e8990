"""``MaskedSelfDistill`` with tiny pure-torch towers (see ``tiny_models.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import EOT, PAD, SOT, assert_all_grads, make_model
from tiny_models import tiny_batch as batch
from tiny_models import tiny_step as step
from tiny_models import tiny_wrapper as wrap
from torch import nn

from masksd import LMVSDConfig, VMLSDConfig
from masksd.losses import consistency_loss, segmentation_loss
from masksd.towers import RISModel

MASK_TOKENS = {"objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"}


# ----------------------------------------------------------------------------- (a) inference


def test_eval_output_equals_bare_model_and_unwrap():
    wrapper = wrap().eval()
    image_tower, text_tower, decoder = (
        wrapper.model.image_tower,
        wrapper.model.text_tower,
        wrapper.model.decoder,
    )
    bare = RISModel(image_tower, text_tower, decoder).eval()
    images, ids, _ = batch()
    with torch.no_grad():
        logits = wrapper(images, ids)
        assert isinstance(logits, torch.Tensor) and logits.shape == (4, 1, 8, 8)
        assert torch.equal(logits, bare(images, ids))
        assert torch.equal(logits, wrapper.unwrap()(images, ids))
        # a target in eval mode is a mistake (it would be ignored): say so
        with pytest.raises(ValueError, match="eval mode.*wrapper.train"):
            wrapper(images, ids, torch.zeros(4, 16, 16))
    assert wrapper.unwrap() is wrapper.model
    assert wrapper.unwrap().decoder is decoder


def test_training_main_logits_equal_inference_logits():
    wrapper = wrap()
    images, ids, target = batch()
    out = step(wrapper, (images, ids, target))
    with torch.no_grad():
        torch.testing.assert_close(out.logits, wrapper.unwrap().eval()(images, ids))


# ------------------------------------------------------------------------- (b) parameters


def test_added_parameters_are_exactly_the_mask_tokens():
    wrapper = wrap()
    image_tower, text_tower, decoder = (
        wrapper.model.image_tower,
        wrapper.model.text_tower,
        wrapper.model.decoder,
    )
    bare = RISModel(image_tower, text_tower, decoder)
    keys = set(wrapper.state_dict())
    assert MASK_TOKENS <= keys
    assert keys - MASK_TOKENS == {"model." + key for key in bare.state_dict()}
    assert set(wrapper.added_parameters()) == MASK_TOKENS
    assert wrapper.state_dict()["objectives.lmvsd.mask_token"].shape == (image_tower.embed_dim,)
    assert wrapper.state_dict()["objectives.vmlsd.mask_token"].shape == (text_tower.embed_dim,)
    n_bare = sum(p.numel() for p in bare.parameters())
    n_wrapped = sum(p.numel() for p in wrapper.parameters())
    assert n_wrapped - n_bare == image_tower.embed_dim + text_tower.embed_dim
    # the bare model's state dict loads into a fresh bare model and gives the same outputs
    fresh = RISModel(*make_model(seed=5))
    fresh.load_state_dict(wrapper.unwrap().state_dict())
    images, ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images, ids), wrapper.eval()(images, ids))


# ----------------------------------------------------------------------- (c) training step


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lmvsd": LMVSDConfig(ratio=0.0), "vmlsd": VMLSDConfig(ratio=0.0)},
        {"lmvsd": LMVSDConfig(top_k=1.0, ratio=1.0), "vmlsd": VMLSDConfig(top_k=1.0, ratio=1.0)},
    ],
    ids=["default", "ratio0", "mask_all"],
)
def test_training_step_losses_and_gradients(kwargs):
    wrapper = wrap(**kwargs)
    images, ids, target = batch()
    out = step(wrapper, (images, ids, target))
    assert out.logits.shape == (4, 1, 8, 8)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd"}
    assert set(out.selections) == {"lmvsd", "vmlsd"}
    for value in out.losses.values():
        assert not value.requires_grad and torch.isfinite(value)
    lmvsd = wrapper.objectives["lmvsd"].config
    vmlsd = wrapper.objectives["vmlsd"].config
    torch.testing.assert_close(
        out.loss,
        out.losses["seg"] + lmvsd.weight * out.losses["lmvsd"] + vmlsd.weight * out.losses["vmlsd"],
    )
    torch.testing.assert_close(out.losses["seg"], segmentation_loss(out.logits.detach(), target))
    for name in ("lmvsd", "vmlsd"):
        branch_logits = out.selections[name]["logits"]
        torch.testing.assert_close(out.losses[name], consistency_loss(branch_logits, out.logits.detach()))
    out.loss.backward()
    assert_all_grads(wrapper)
    lm_token = wrapper.objectives["lmvsd"].mask_token
    vm_token = wrapper.objectives["vmlsd"].mask_token
    if lmvsd.ratio == 0.0:
        assert not out.selections["lmvsd"]["masked"].any()
        assert not out.selections["vmlsd"]["masked"].any()
        assert bool((lm_token.grad == 0).all()) and bool((vm_token.grad == 0).all())
        # nothing masked: the branches reproduce the main prediction
        torch.testing.assert_close(out.selections["lmvsd"]["logits"], out.logits.detach())
        torch.testing.assert_close(out.selections["vmlsd"]["logits"], out.logits.detach())
    if lmvsd.ratio == 1.0:
        assert out.selections["lmvsd"]["masked"].all()
        assert bool(lm_token.grad.abs().sum() > 0) and bool(vm_token.grad.abs().sum() > 0)


def test_masked_counts_in_training_follow_the_rules():
    wrapper = wrap(lmvsd=LMVSDConfig(top_k=0.5, ratio=0.25), vmlsd=VMLSDConfig(top_k=1.0, ratio=1.0))
    images, ids, target = batch(6)
    out = step(wrapper, (images, ids, target))
    kept, masked = out.selections["lmvsd"]["kept"], out.selections["lmvsd"]["masked"]
    assert kept.shape == masked.shape == (6, 16)
    assert kept.sum(dim=1).tolist() == [8] * 6
    assert masked.sum(dim=1).tolist() == [2] * 6
    assert not (masked & ~kept).any()
    # LMVSD keeps the image tokens best correlated with the sentence feature
    with torch.no_grad():
        image, text = wrapper.unwrap().encode(images, ids)
        scores = torch.einsum("bd,bnd->bn", text.global_feature, image.tokens)
    assert torch.equal(kept, scores >= scores.topk(8, dim=1).values[:, -1:])


# ------------------------------------------------------------------------------ (d) ablations


def test_lmvsd_none_removes_branch_and_token():
    for value in (None, False):
        wrapper = wrap(lmvsd=value)
        assert set(wrapper.objectives) == {"vmlsd"}
        assert set(wrapper.added_parameters()) == {"objectives.vmlsd.mask_token"}
        out = step(wrapper)
        assert set(out.losses) == {"seg", "vmlsd"}
        out.loss.backward()
        assert_all_grads(wrapper)
    assert set(wrap(vmlsd=None).objectives) == {"lmvsd"}
    assert set(wrap(lmvsd=LMVSDConfig(enabled=False)).objectives) == {"vmlsd"}
    both_off = wrap(lmvsd=None, vmlsd=None)
    assert set(both_off.state_dict()) == {"model." + k for k in both_off.unwrap().state_dict()}
    out = step(both_off)
    assert set(out.losses) == {"seg"}
    torch.testing.assert_close(out.loss, out.losses["seg"])


def test_no_masking_ablation():
    wrapper = wrap(lmvsd=LMVSDConfig(masking=False))
    assert wrapper.objectives["lmvsd"].mask_token is None
    assert set(wrapper.added_parameters()) == {"objectives.vmlsd.mask_token"}
    out = step(wrapper)
    assert out.selections["lmvsd"]["kept"].any()
    assert not out.selections["lmvsd"]["masked"].any()
    torch.testing.assert_close(out.selections["lmvsd"]["logits"], out.logits.detach())
    out.loss.backward()
    assert_all_grads(wrapper)


def test_ground_truth_supervision():
    wrapper = wrap(supervision="ground_truth")
    images, ids, target = batch()
    out = step(wrapper, (images, ids, target))
    for name in ("lmvsd", "vmlsd"):
        branch = out.selections[name]["logits"]
        torch.testing.assert_close(out.losses[name], segmentation_loss(branch, target))
        assert not torch.allclose(out.losses[name], consistency_loss(branch, out.logits.detach()))
    distill = step(wrap(), (images, ids, target))
    # same weights, same masks: same branch logits, different losses
    torch.testing.assert_close(distill.selections["lmvsd"]["logits"], out.selections["lmvsd"]["logits"])
    assert not torch.allclose(distill.losses["lmvsd"], out.losses["lmvsd"])


def test_unshared_decoder_copies():
    # mask every word: an unmasked branch equals the main branch at initialisation, and
    # BCE(x, sigmoid(x)) has a zero gradient
    wrapper = wrap(share_decoder=False, vmlsd=VMLSDConfig(top_k=1.0, ratio=1.0))
    main_params = {id(p) for p in wrapper.model.decoder.parameters()}
    keys = set(wrapper.state_dict())
    for name in ("lmvsd", "vmlsd"):
        private = wrapper.objectives[name].decoder
        assert private is not None and private is not wrapper.model.decoder
        assert any(k.startswith(f"objectives.{name}.decoder.") for k in keys)
        assert not ({id(p) for p in private.parameters()} & main_params)
        for p_private, p_main in zip(private.parameters(), wrapper.model.decoder.parameters()):
            assert torch.equal(p_private, p_main)  # a copy of the initial weights
    lm_ids = {id(p) for p in wrapper.objectives["lmvsd"].decoder.parameters()}
    vm_ids = {id(p) for p in wrapper.objectives["vmlsd"].decoder.parameters()}
    assert not lm_ids & vm_ids
    assert set(wrapper.added_parameters()) - MASK_TOKENS == {
        k for k in keys if k.startswith(("objectives.lmvsd.decoder.", "objectives.vmlsd.decoder."))
    }
    out = step(wrapper)
    out.loss.backward()
    assert_all_grads(wrapper)
    for name in ("lmvsd", "vmlsd"):
        assert all(bool(p.grad.abs().sum() > 0) for p in wrapper.objectives[name].decoder.parameters())
    # eval still runs the main decoder only, bit for bit the bare model
    images, ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(wrapper.eval()(images, ids), wrapper.unwrap()(images, ids))


def test_unshared_batchnorm_decoder_keeps_main_statistics():
    images, ids, target = batch()
    unshared = wrap(batch_norm=True, share_decoder=False)
    reference = copy.deepcopy(unshared.unwrap()).train()
    with torch.no_grad():
        reference(images, ids)
    step(unshared, (images, ids, target)).loss.backward()
    main_bn = unshared.model.decoder.bn
    assert int(main_bn.num_batches_tracked) == 1
    torch.testing.assert_close(main_bn.running_mean, reference.decoder.bn.running_mean)
    torch.testing.assert_close(main_bn.running_var, reference.decoder.bn.running_var)
    for name in ("lmvsd", "vmlsd"):
        private_bn = unshared.objectives[name].decoder.bn
        assert private_bn.running_mean is not main_bn.running_mean
        assert int(private_bn.num_batches_tracked) == 1
    assert_all_grads(unshared)
    # shared decoder: the masked branches run the same BatchNorm with their own batch
    # statistics, but only the main pass updates the running statistics used at inference
    shared = wrap(batch_norm=True)
    reference = copy.deepcopy(shared.unwrap()).train()
    with torch.no_grad():
        reference(images, ids)
    step(shared, (images, ids, target)).loss.backward()
    shared_bn = shared.model.decoder.bn
    assert int(shared_bn.num_batches_tracked) == 1
    assert shared_bn.momentum == reference.decoder.bn.momentum
    torch.testing.assert_close(shared_bn.running_mean, reference.decoder.bn.running_mean)
    torch.testing.assert_close(shared_bn.running_var, reference.decoder.bn.running_var)
    assert_all_grads(shared)


def test_hard_targets_change_consistency_loss():
    images, ids, target = batch()
    hard = step(wrap(hard_targets=True), (images, ids, target))
    soft = step(wrap(), (images, ids, target))
    for name in ("lmvsd", "vmlsd"):
        branch = hard.selections[name]["logits"]
        torch.testing.assert_close(branch, soft.selections[name]["logits"])
        torch.testing.assert_close(
            hard.losses[name], consistency_loss(branch, hard.logits.detach(), hard=True)
        )
        assert not torch.allclose(hard.losses[name], soft.losses[name])
    torch.testing.assert_close(hard.losses["seg"], soft.losses["seg"])
    threshold = step(wrap(hard_targets=True, threshold=0.7), (images, ids, target))
    torch.testing.assert_close(
        threshold.losses["lmvsd"],
        consistency_loss(
            threshold.selections["lmvsd"]["logits"], threshold.logits.detach(), hard=True, threshold=0.7
        ),
    )


def test_branches_mask_only_their_modality_and_never_special_tokens():
    wrapper = wrap(lmvsd=LMVSDConfig(top_k=1.0, ratio=1.0), vmlsd=VMLSDConfig(top_k=1.0, ratio=1.0))
    images, ids, target = batch(6)
    out = step(wrapper, (images, ids, target))
    special = (ids == PAD) | (ids == SOT) | (ids == EOT)
    vm_kept, vm_masked = out.selections["vmlsd"]["kept"], out.selections["vmlsd"]["masked"]
    assert vm_kept.shape == ids.shape
    assert not (vm_kept & special).any() and not (vm_masked & special).any()
    assert torch.equal(vm_masked, ~special)  # everything else is masked at ratio 1
    lm_masked = out.selections["lmvsd"]["masked"]
    assert lm_masked.shape == (6, 16) and lm_masked.all()
    # default VMLSD settings on short sentences never touch special tokens either
    for seed in range(5):
        out = step(wrap(), (images, ids, target), seed=seed)
        assert not (out.selections["vmlsd"]["kept"] & special).any()


# ------------------------------------------------------------------------- (e) call counts


def _count_calls(monkeypatch, module: nn.Module, method: str) -> list:
    calls: list = []
    original = getattr(module, method)

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(module, method, counted)
    return calls


@pytest.mark.parametrize(
    ("lmvsd", "vmlsd", "image_calls", "text_calls"),
    [(True, True, 2, 2), (True, None, 2, 1), (None, True, 1, 2), (None, None, 1, 1)],
)
def test_each_branch_reencodes_only_its_modality(monkeypatch, lmvsd, vmlsd, image_calls, text_calls):
    wrapper = wrap(lmvsd=lmvsd, vmlsd=vmlsd)
    model = wrapper.unwrap()
    image_encode = _count_calls(monkeypatch, model.image_tower, "encode")
    text_encode = _count_calls(monkeypatch, model.text_tower, "encode")
    image_embed = _count_calls(monkeypatch, model.image_tower, "embed")
    text_embed = _count_calls(monkeypatch, model.text_tower, "embed")
    decoder_calls = _count_calls(monkeypatch, model.decoder, "forward")
    step(wrapper)
    assert len(image_encode) == image_calls and len(text_encode) == text_calls
    assert len(image_embed) == 1 and len(text_embed) == 1
    assert len(decoder_calls) == 1 + (lmvsd is not None) + (vmlsd is not None)
    main_image, main_text = image_encode[0][1], text_encode[0][1]
    main_args = decoder_calls[0][0]
    assert main_args[0] is main_image and main_args[1] is main_text
    branch_calls = decoder_calls[1:]
    if lmvsd is not None:  # LMVSD: new image features, the main branch's text features
        args = branch_calls.pop(0)[0]
        assert args[0] is image_encode[1][1] and args[1] is main_text
    if vmlsd is not None:  # VMLSD: the main branch's image features, new text features
        args = branch_calls.pop(0)[0]
        assert args[0] is main_image and args[1] is text_encode[-1][1]


def test_eval_runs_each_tower_once(monkeypatch):
    wrapper = wrap().eval()
    image_encode = _count_calls(monkeypatch, wrapper.model.image_tower, "encode")
    text_encode = _count_calls(monkeypatch, wrapper.model.text_tower, "encode")
    images, ids, _ = batch()
    with torch.no_grad():
        wrapper(images, ids)
    assert len(image_encode) == 1 and len(text_encode) == 1


# --------------------------------------------------------------------------- (f) determinism


def test_same_generator_seed_gives_identical_losses():
    data = batch()
    first = step(wrap(), data, seed=3)
    second = step(wrap(), data, seed=3)
    for name in first.losses:
        assert torch.equal(first.losses[name], second.losses[name])
    for name in first.selections:
        assert torch.equal(first.selections[name]["masked"], second.selections[name]["masked"])
    assert torch.equal(first.loss, second.loss)
    masks = {
        tuple(step(wrap(), data, seed=s).selections["lmvsd"]["masked"].flatten().tolist()) for s in range(6)
    }
    assert len(masks) > 1, "different seeds should give different masks"

"""What the real CRIS.pytorch and LAVT-RIS exposed, on the RIS-style test models (tests/ris_models):
checks that run before the model, the user's own criterion, degenerate scorers, dropout replay and
a user-given unit grid."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from einops import rearrange

import masksd
from masksd import HookSpec, LMVSDConfig, ModalitySpec, Tap, VMLSDConfig
from masksd.scorer_health import MasksdWarning

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
pytest.importorskip("transformers")
from ris_models import cris_style, lavt_style  # noqa: E402
from test_hooks_ris_models import cris_spec, lavt_spec  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _cris() -> tuple[masksd.MaskedSelfDistill, list[int]]:
    torch.manual_seed(0)
    model = cris_style.CRIS()
    wrapper = masksd.wrap(model, cris_spec())
    return wrapper.train(), _count_forwards(model)


# ------------------------------------------------------------------ checks before the model runs
def test_a_0_255_target_is_refused_even_when_the_model_computes_its_own_loss():
    wrapper, calls = _cris()
    batch = cris_style.make_batch()
    with pytest.raises(ValueError, match=r"binary mask.*255"):
        wrapper(batch.img, batch.word, batch.mask * 255)
    with pytest.raises(ValueError, match=r"binary mask"):
        wrapper.check(batch.img, batch.word, (batch.mask * 255).to(torch.uint8))
    assert calls[0] == 0  # the model never ran


def test_a_missing_target_gets_masksds_message_before_the_model_runs():
    wrapper, calls = _cris()
    batch = cris_style.make_batch()
    with pytest.raises(ValueError, match=r"target .* is required in training mode .*'mask', HookSpec.target"):
        wrapper(batch.img, batch.word)
    with pytest.raises(ValueError, match=r"required in training mode"):
        wrapper.check(batch.img, batch.word)
    assert calls[0] == 0


def test_image_and_word_batches_of_different_sizes_are_named_before_the_model_runs():
    wrapper, calls = _cris()
    batch = cris_style.make_batch()
    with pytest.raises(ValueError,
                       match=r"different batch sizes \('img' \(the images\) 2, 'word' \(the ids\) 3"):
        wrapper(batch.img[:2], batch.word[:3], batch.mask[:2])
    with pytest.raises(ValueError, match=r"different batch sizes"):
        wrapper.check(batch.img[:2], batch.word[:3], batch.mask[:2])
    with pytest.raises(ValueError, match=r"'mask' \(HookSpec.target\) 3"):
        wrapper(batch.img[:2], batch.word[:2], batch.mask[:3])
    assert calls[0] == 0


def test_lavt_target_of_another_batch_size_is_refused():
    torch.manual_seed(0)
    wrapper = masksd.wrap(lavt_style.LAVTOne(), lavt_spec()).train()
    batch = lavt_style.make_batch()
    with pytest.raises(ValueError, match=r"target holds 3 masks but the inputs hold 4 samples"):
        wrapper(batch.image, batch.input_ids, batch.attention_mask, target=batch.target[:3])
    with pytest.raises(ValueError, match=r"'attention_mask' \(the attention mask\) 2"):
        wrapper(batch.image, batch.input_ids, batch.attention_mask[:2], target=batch.target)


# ------------------------------------------------------------------------- the user's criterion
def test_lavt_weighted_cross_entropy_as_the_criterion_is_reproduced_exactly():
    torch.manual_seed(0)
    wrapper = masksd.wrap(lavt_style.LAVTOne(), lavt_spec(), criterion=lavt_style.lavt_loss).train()
    batch = lavt_style.make_batch()
    out = wrapper(batch.image, batch.input_ids, batch.attention_mask, target=batch.target,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.losses["seg"], lavt_style.lavt_loss(out.output, batch.target).detach())
    unweighted = torch.nn.functional.cross_entropy(out.output, batch.target).detach()
    assert not torch.equal(out.losses["seg"], unweighted)  # the weights [0.9, 1.1] count
    expected = out.losses["seg"] + 0.75 * out.losses["lmvsd"] + 0.1 * out.losses["vmlsd"]
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()


def test_criterion_and_the_models_own_loss_are_refused_together():
    with pytest.raises(ValueError, match=r"either criterion= .* or HookSpec.loss"):
        masksd.wrap(cris_style.CRIS(), cris_spec(), criterion=lavt_style.lavt_loss)
    with pytest.raises(TypeError, match=r"criterion must be callable"):
        masksd.wrap(lavt_style.LAVTOne(), lavt_spec(), criterion="ce")


def test_criterion_that_returns_no_scalar_is_refused():
    wrapper = masksd.wrap(lavt_style.LAVTOne(), lavt_spec(), criterion=lambda logits, target: logits).train()
    batch = lavt_style.make_batch()
    with pytest.raises(ValueError, match=r"criterion\(logits, target\) must give a scalar loss"):
        wrapper(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)


# -------------------------------------------------------------------------- degenerate scorers
def test_degenerate_scorer_on_an_instance_normed_tap_is_reported_with_its_fix():
    torch.manual_seed(0)
    wrapper = masksd.wrap(lavt_style.LAVTOne(), lavt_spec())
    batch = lavt_style.make_batch()
    report = wrapper.check(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)
    assert len(report.warnings) == 1 and report.warnings[0].startswith("vmlsd: scorer 'correlation'")
    assert "image global feature is nearly zero" in report.warnings[0] and "f_query.0" in str(report)
    torch.manual_seed(0)
    wrapper = masksd.wrap(lavt_style.LAVTOne(), lavt_spec()).train()  # no check(): the first step warns
    with pytest.warns(MasksdWarning, match=r"vmlsd: .*nearly zero"):
        wrapper(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MasksdWarning)  # warned once, not at every step
        wrapper(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)


def test_the_fix_tapping_before_the_instance_norm_silences_it():
    pwam = "backbone.layers.2.fusion.image_lang_att"
    spec = lavt_spec()
    image = dataclasses.replace(spec.image, tokens=Tap(f"{pwam}.f_query.0", layout="bcn"))
    torch.manual_seed(0)
    wrapper = masksd.wrap(lavt_style.LAVTOne(), dataclasses.replace(spec, image=image))
    batch = lavt_style.make_batch()
    report = wrapper.check(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)
    assert report.warnings == []


def test_a_reuse_module_the_model_never_calls_is_reported():
    """The CRIS-style model runs its attention pool through ``F.multi_head_attention_forward`` with
    ``attnpool``'s weights, so ``attnpool.c_proj`` never runs as a module: listed in ``reuse`` it
    can reuse nothing, and ``check()`` says so (the recipe's ``attnpool.connect`` does run)."""
    spec = cris_spec()
    image = dataclasses.replace(spec.image, reuse=(*spec.image.reuse, "backbone.visual.attnpool.c_proj"))
    torch.manual_seed(0)
    wrapper = masksd.wrap(cris_style.CRIS(), dataclasses.replace(spec, image=image))
    batch = cris_style.make_batch(seed=0)
    report = wrapper.check(batch.img, batch.word, batch.mask)
    assert len(report.warnings) == 1, report.warnings
    assert "'backbone.visual.attnpool.c_proj' never ran as a module" in report.warnings[0]
    assert "attnpool.connect" not in report.warnings[0] and "warning: reuse module" in str(report)
    wrapper = masksd.wrap(cris_style.CRIS(), cris_spec())
    assert wrapper.check(batch.img, batch.word, batch.mask).warnings == []


def test_reference_model_scorers_are_not_degenerate():
    pytest.importorskip("open_clip")
    from examples.cris_clip.model import MODEL_CONFIGS, build_model, hook_spec

    torch.manual_seed(0)
    wrapper = masksd.wrap(build_model(MODEL_CONFIGS["demo"]), hook_spec())
    g = torch.Generator().manual_seed(0)
    texts = torch.zeros(4, 17, dtype=torch.long)
    texts[:, 0], texts[:, 1:5], texts[:, 5] = 49406, torch.randint(1, 49000, (4, 4), generator=g), 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error", MasksdWarning)
        report = wrapper.check(torch.randn(4, 3, 64, 64, generator=g), texts,
                               target=torch.rand(4, 64, 64, generator=g) > 0.5)
    assert report.warnings == []


# -------------------------------------------------------------------------------- dropout replay
def _unmasked_branches_differ(wrapper, *batch, target) -> dict[str, float]:
    out = wrapper.train()(*batch, target=target, generator=torch.Generator().manual_seed(0))
    return {name: float((s["logits"] - out.logits.detach()).abs().max())
            for name, s in out.selections.items()}


@pytest.mark.parametrize("dropout", ["fresh", "replay"])
def test_replayed_dropout_makes_unmasked_branches_equal_the_main_branch(dropout):
    """LAVT-style (BERT dropout 0.1, drop-path 0.1; the masked-image branch skips the text encoder)
    and CRIS-style (decoder dropout 0.1; both branches skip the other encoder)."""
    off = dict(lmvsd=LMVSDConfig(masking=False), vmlsd=VMLSDConfig(masking=False), dropout=dropout)
    torch.manual_seed(0)
    lavt = masksd.wrap(lavt_style.LAVTOne(), lavt_spec(), **off)
    b = lavt_style.make_batch()
    torch.manual_seed(0)
    cris = masksd.wrap(cris_style.CRIS(), cris_spec(), **off)
    c = cris_style.make_batch()
    gaps = {**{f"lavt {k}": v
               for k, v in _unmasked_branches_differ(lavt, b.image, b.input_ids, b.attention_mask,
                                                     target=b.target).items()},
            **{f"cris {k}": v
               for k, v in _unmasked_branches_differ(cris, c.img, c.word, target=c.mask).items()}}
    if dropout == "replay":
        assert gaps == dict.fromkeys(gaps, 0.0)
    else:
        assert all(gap > 1e-3 for gap in gaps.values()), gaps


def test_dropout_mode_is_validated():
    with pytest.raises(ValueError, match=r"dropout must be one of \('fresh', 'replay'\)"):
        masksd.DistillConfig(dropout="same")


def test_replayed_dropout_on_the_tower_backend():
    """The tiny towers with dropout 0.3 in every transformer layer: each branch re-encodes one
    modality and decodes; replay starts it from the main branch's state before that encoder."""
    from tiny_models import make_model, tiny_batch

    image_tower, text_tower, decoder = make_model()
    for module in (*image_tower.modules(), *text_tower.modules()):
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    off = dict(lmvsd=LMVSDConfig(masking=False), vmlsd=VMLSDConfig(masking=False))
    images, texts, target = tiny_batch()
    for dropout, equal in (("replay", True), ("fresh", False)):
        wrapper = masksd.MaskedSelfDistill(image_tower, text_tower, decoder, dropout=dropout, **off).train()
        out = wrapper(images, texts, target)
        for name, selection in out.selections.items():
            assert torch.equal(selection["logits"], out.logits.detach()) is equal, (dropout, name)


# ------------------------------------------------------------------------------- unit grid given
def test_user_given_unit_grid_masks_blocks_without_a_scoring_tap():
    """LAVT "without PWAM": scorer='prediction', no tokens tap; units=(4, 4) (the stage-3 grid)
    makes each masked unit a solid 4x4 block of the 16x16 patch grid."""
    spec = lavt_spec()
    image = dataclasses.replace(spec.image, tokens=None, units=(4, 4))
    spec = dataclasses.replace(spec, image=image)
    assert HookSpec.from_dict(spec.to_dict()) == spec
    torch.manual_seed(0)
    wrapper = masksd.wrap(lavt_style.LAVTOne(), spec, lmvsd=LMVSDConfig(scorer="prediction", ratio=0.5),
                          vmlsd=None)
    seen = []
    embed = wrapper.unwrap().backbone.patch_embed
    embed.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    b = lavt_style.make_batch()
    out = wrapper.train()(b.image, b.input_ids, b.attention_mask, target=b.target,
                          generator=torch.Generator().manual_seed(0))
    selection = out.selections["lmvsd"]
    assert selection["grid"] == (4, 4) and selection["kept"].sum(1).tolist() == [8] * 4
    token = wrapper.objectives["lmvsd"].mask_token.detach()
    replaced = (seen[-1] == token[None, :, None, None]).all(1)  # the masked-image pass [B, 16, 16]
    blocks = (rearrange(selection["masked"], "b (h w) -> b h w", h=4)
              .repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert torch.equal(replaced, blocks)


def test_unit_grid_that_contradicts_the_scoring_tokens_is_refused():
    spec = lavt_spec()
    spec = dataclasses.replace(spec, image=dataclasses.replace(spec.image, units=(8, 8)))
    wrapper = masksd.wrap(lavt_style.LAVTOne(), spec, vmlsd=None).train()
    b = lavt_style.make_batch()
    with pytest.raises(ValueError,
                       match=r"units is \(8, 8\) but the image scoring tokens lie on a \(4, 4\) grid"):
        wrapper(b.image, b.input_ids, b.attention_mask, target=b.target)
    with pytest.raises(ValueError, match=r"ModalitySpec.units must be a pair of positive ints"):
        ModalitySpec(embed="x", units=(0, 4))

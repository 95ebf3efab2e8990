"""Scorers other than the paper's correlation: what the branches keep under each (tiny towers)."""

from __future__ import annotations

import pytest
import torch
from hook_models import PAD as HOOK_PAD
from hook_models import TinyRIS, make_batch, tiny_spec
from tiny_models import EOT, PAD, SOT
from tiny_models import tiny_batch as batch
from tiny_models import tiny_step as step
from tiny_models import tiny_wrapper as wrap

import masksd
from masksd import LMVSDConfig, Maskable, ModalitySpec, VMLSDConfig


def _kept_score_at_least_dropped(kept: torch.Tensor, scores: torch.Tensor, maskable: torch.Tensor) -> bool:
    """Every kept token scores at least as high as every maskable token that was not kept."""
    low = scores.masked_fill(~kept, float("inf")).amin(dim=1)
    high = scores.masked_fill(kept | ~maskable, float("-inf")).amax(dim=1)
    return bool((low >= high).all())


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_late_interaction_keeps_the_tokens_best_matched_by_a_token_of_the_other_modality(metric):
    wrapper = wrap(lmvsd=LMVSDConfig(top_k=0.5, ratio=0.25, scorer="late_interaction", metric=metric),
                   vmlsd=VMLSDConfig(top_k=0.5, ratio=0.5, scorer="late_interaction", metric=metric))
    images, ids, target = batch(6)
    out = step(wrapper, (images, ids, target))
    with torch.no_grad():
        image, text = wrapper.unwrap().encode(images, ids)
    patches, words = image.tokens, text.tokens
    if metric == "cosine":
        patches, words = (torch.nn.functional.normalize(patches, dim=-1),
                          torch.nn.functional.normalize(words, dim=-1))
    similarity = torch.einsum("bnd,bmd->bnm", patches, words)  # [B, patches, words]
    real_words = (ids != PAD) & (ids != SOT) & (ids != EOT)
    patch_scores = similarity.masked_fill(~real_words[:, None, :], float("-inf")).amax(dim=2)
    word_scores = similarity.amax(dim=1)
    kept = out.selections["lmvsd"]["kept"]
    assert kept.sum(dim=1).tolist() == [8] * 6
    assert torch.equal(kept, patch_scores >= patch_scores.topk(8, dim=1).values[:, -1:])
    # against the sentence feature (the paper's scorer) the choice differs on this batch
    correlation = torch.einsum("bd,bnd->bn", text.global_feature, image.tokens)
    assert not torch.equal(kept, correlation >= correlation.topk(8, dim=1).values[:, -1:])
    words_kept = out.selections["vmlsd"]["kept"]
    assert not (words_kept & ~real_words).any()
    assert _kept_score_at_least_dropped(words_kept, word_scores, real_words)


def test_late_interaction_on_a_hooked_cnn_scores_the_coarse_grid_and_needs_both_token_taps():
    torch.manual_seed(0)
    options = {"lmvsd": LMVSDConfig(top_k=0.5, scorer="late_interaction"),
               "vmlsd": VMLSDConfig(top_k=0.5, scorer="late_interaction")}
    wrapper = masksd.wrap(TinyRIS(), tiny_spec(), **options)
    images, ids, masks = make_batch()
    wrapper.train()
    out = wrapper(images, ids, target=masks, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    kept = out.selections["lmvsd"]["kept"]  # selected on the 4x4 backbone grid (the scoring units)
    assert kept.shape == (4, 16) and kept.sum(dim=1).tolist() == [8] * 4
    assert all(p.grad is not None for p in wrapper.parameters() if p.requires_grad)
    no_text_tokens = tiny_spec(text=ModalitySpec(embed="word_embed",
                                                 maskable=Maskable(ids="ids", never=(HOOK_PAD,)),
                                                 reuse=("text_encoder",)))
    with pytest.raises(ValueError, match="scorer='late_interaction'.*HookSpec.text.tokens"):
        masksd.wrap(TinyRIS(), no_text_tokens, lmvsd=LMVSDConfig(scorer="late_interaction"),
                    vmlsd=VMLSDConfig(scorer="random"))


def test_a_registered_scorer_is_chosen_by_name_and_its_needs_are_checked_at_wrap_time():
    from masksd.scorers import register_scorer

    calls = []

    @register_scorer("test_first_units", needs=("tokens", "other_global"))
    def first_units(context, modality, *, metric, surgery):  # prefers the first units of each row
        calls.append((modality, metric))
        maskable = context.embedded(modality).maskable
        return -torch.arange(maskable.shape[1], dtype=torch.float32).expand(maskable.shape)

    wrapper = wrap(lmvsd=LMVSDConfig(top_k=0.25, ratio=0.0, scorer="test_first_units"), vmlsd=None)
    out = step(wrapper, batch(2))
    kept = out.selections["lmvsd"]["kept"]
    assert (calls == [("image", "dot")] and kept[:, : kept.shape[1] // 4].all()
            and not kept[:, kept.shape[1] // 4 :].any())
    spec = tiny_spec()
    no_tokens = masksd.HookSpec(image=ModalitySpec(embed=spec.image.embed, layout=spec.image.layout),
                                text=spec.text)
    with pytest.raises(ValueError, match=r"scorer='test_first_units', which needs HookSpec.image.tokens"):
        masksd.wrap(TinyRIS(), no_tokens, lmvsd=LMVSDConfig(scorer="test_first_units"), vmlsd=None)
    with pytest.raises(ValueError, match=r"scorer must be one of .*'test_first_units'.*got 'nope'"):
        LMVSDConfig(scorer="nope")
    with pytest.raises(ValueError, match=r"unknown needs \['everything'\]"):
        register_scorer("broken", needs=("everything",))  # type: ignore[arg-type]

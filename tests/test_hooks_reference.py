"""The reference CLIP-ViT + CRIS model (examples/cris_clip) wrapped through hooks selects, scores
and computes the objectives that read the decoder's fused features (``hook_spec().fused``) exactly
as through its towers: one engine, two backends."""

from __future__ import annotations

import pytest
import torch

import masksd

open_clip = pytest.importorskip("open_clip")
from examples.cris_clip.model import MODEL_CONFIGS, build_model, hook_spec  # noqa: E402

SOT, EOT, PAD = 49406, 49407, 0
DEMO = MODEL_CONFIGS["demo"]


def _further_objectives() -> list[masksd.Objective]:
    """The objectives that read the decoder's fused features, sized for the demo (no dropout, so
    both backends draw nothing from the global generator)."""
    size = dict(width=DEMO.head_dim, heads=DEMO.head_heads, ffn=DEMO.head_ffn, dropout=0.0)
    return [masksd.objectives.LanguageReconstruction(fused_dim=DEMO.head_dim, text_dim=64,
                                          config=masksd.objectives.LanguageReconstructionConfig(**size)),
            masksd.objectives.CrossModalAlignment(
                config=masksd.objectives.CrossModalAlignmentConfig(features="fused"), text_dim=64,
                fused_dim=DEMO.head_dim, name="cal_fused",
            )]


def _models():
    """The demo model through towers and through hooks: same weights, LMVSD + VMLSD + the fused-feature
    objectives (each backend its own, identically initialised, copies)."""
    torch.manual_seed(0)
    towers_model = build_model(DEMO)
    towers = masksd.MaskedSelfDistill(towers_model.image_tower, towers_model.text_tower, towers_model.decoder,
                                      extra_objectives=_further_objectives())
    torch.manual_seed(0)
    hooks = masksd.wrap(build_model(DEMO), hook_spec(), extra_objectives=_further_objectives())
    assert towers.state_dict().keys() == hooks.state_dict().keys()
    for key, value in towers.state_dict().items():
        assert torch.equal(value, hooks.state_dict()[key]), key
    return towers, hooks


def test_hooks_and_towers_give_the_same_selections_losses_and_gradients():
    """LMVSD, VMLSD, and ``lang_rec`` / ``cal_fused``, which read ``hook_spec().fused`` (hooks) and
    ``CRISDecoder.forward_with_fused`` (towers): the same selections, losses and gradients."""
    towers, hooks = _models()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    texts = torch.full((4, 17), PAD, dtype=torch.long)
    for i, n in enumerate((3, 6, 1, 9)):
        texts[i, 0], texts[i, n + 1] = SOT, EOT
        texts[i, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)  # rectangles: CAL has referent and background cells
    for i, (y, x, h, w) in enumerate(((4, 8, 30, 20), (20, 0, 40, 50), (0, 30, 16, 34), (10, 10, 44, 44))):
        masks[i, y : y + h, x : x + w] = True
    for step in range(1):
        a = towers.train()(images, texts, masks, generator=torch.Generator().manual_seed(step))
        b = hooks.train()(images, texts, target=masks, generator=torch.Generator().manual_seed(step))
        for name in ("lmvsd", "vmlsd"):
            assert torch.equal(a.selections[name]["kept"], b.selections[name]["kept"]), name
            assert torch.equal(a.selections[name]["masked"], b.selections[name]["masked"]), name
            torch.testing.assert_close(a.selections[name]["logits"], b.selections[name]["logits"])
        assert a.losses.keys() == b.losses.keys() == {"seg", "lmvsd", "vmlsd", "lang_rec", "cal_fused"}
        assert (a.losses["lang_rec"] > 0 and a.losses["cal_fused"] > 0
                and a.selections["cal_fused"]["valid"].any())
        for name in a.losses:
            torch.testing.assert_close(a.losses[name], b.losses[name])
        a.loss.backward()
        b.loss.backward()
        grads_a = dict(towers.named_parameters())
        for name, p in hooks.named_parameters():  # equal up to float32 summation order
            expected = grads_a[name].grad
            assert (p.grad - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-7, name
        assert hooks.describe()["fusion"] == "late"
    hooks.eval()
    towers.eval()
    with torch.no_grad():
        assert torch.equal(hooks(images, texts), towers(images, texts))

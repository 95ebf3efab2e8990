"""The reference CLIP-ViT + CRIS model (examples/cris_clip) wrapped through hooks selects and
scores exactly as through its towers: one engine, two backends."""

from __future__ import annotations

import pytest
import torch

import masksd

open_clip = pytest.importorskip("open_clip")
from examples.cris_clip.model import MODEL_CONFIGS, build_model, hook_spec  # noqa: E402

SOT, EOT, PAD = 49406, 49407, 0


def _models():
    torch.manual_seed(0)
    towers_model = build_model(MODEL_CONFIGS["demo"])
    towers = masksd.MaskedSelfDistill(towers_model.image_tower, towers_model.text_tower, towers_model.decoder)
    torch.manual_seed(0)
    hooks = masksd.wrap(build_model(MODEL_CONFIGS["demo"]), hook_spec())
    assert towers.state_dict().keys() == hooks.state_dict().keys()
    for key, value in towers.state_dict().items():
        assert torch.equal(value, hooks.state_dict()[key]), key
    return towers, hooks


def test_hooks_and_towers_give_the_same_selections_losses_and_gradients():
    towers, hooks = _models()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    texts = torch.full((4, 17), PAD, dtype=torch.long)
    for i, n in enumerate((3, 6, 1, 9)):
        texts[i, 0], texts[i, n + 1] = SOT, EOT
        texts[i, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
    masks = torch.rand(4, 64, 64, generator=g) > 0.5
    for step in range(1):
        a = towers.train()(images, texts, masks, generator=torch.Generator().manual_seed(step))
        b = hooks.train()(images, texts, target=masks, generator=torch.Generator().manual_seed(step))
        for name in ("lmvsd", "vmlsd"):
            assert torch.equal(a.selections[name]["kept"], b.selections[name]["kept"]), name
            assert torch.equal(a.selections[name]["masked"], b.selections[name]["masked"]), name
            torch.testing.assert_close(a.selections[name]["logits"], b.selections[name]["logits"])
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

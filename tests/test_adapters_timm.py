"""``masksd.adapters.timm`` against tiny random-init timm Vision Transformers (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from masksd import LMVSDConfig, MaskedSelfDistill, VMLSDConfig  # noqa: E402
from masksd.adapters.timm import TimmViTImageTower, tower_from_timm_vit  # noqa: E402
from masksd.towers import Embedded, Encoded  # noqa: E402

WIDTH = 32
VARIANTS = {
    "cls": dict(),
    "registers": dict(reg_tokens=2),
    "avg_no_cls": dict(global_pool="avg", class_token=False),
    "dynamic_size": dict(dynamic_img_size=True),
    "clip_head": dict(num_classes=24),  # head = a projection into a joint space (head=True)
}


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    kwargs = dict(img_size=32, patch_size=8, embed_dim=WIDTH, depth=2, num_heads=2, num_classes=0)
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(**kwargs)


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class TextTower(nn.Module):
    """A minimal text tower (ids ``[B, L]``, 0 = padding, 1 = EOT) with output width ``dim``."""

    def __init__(self, dim: int = WIDTH, width: int = 16, length: int = 6) -> None:
        super().__init__()
        self.embed_dim = width
        self.table = nn.Embedding(20, width)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        self.proj = nn.Linear(width, dim)

    def embed(self, ids: torch.Tensor) -> Embedded:
        return Embedded(tokens=self.table(ids), maskable=ids > 1, extras={"ids": ids})

    def encode(self, embedded: Embedded) -> Encoded:
        x = torch.tanh(embedded.tokens + self.pos)
        words = self.proj(x + x.mean(dim=1, keepdim=True))  # every word reaches the sentence
        eot = (embedded.extras["ids"] == 1).int().argmax(dim=1)
        sentence = words[torch.arange(words.shape[0]), eot]
        return Encoded(tokens=words, global_feature=sentence, features={"words": words})


class Decoder(nn.Module):
    def __init__(self, dim: int = WIDTH) -> None:
        super().__init__()
        self.tokens_in = nn.Linear(dim, 16)
        self.level_in = nn.Conv2d(WIDTH, 16, 1)
        self.sentence_in = nn.Linear(dim, 16)
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, image, text):
        gh, gw = image.features["grid"]
        f = self.tokens_in(image.tokens).transpose(1, 2).reshape(-1, 16, gh, gw)
        for level in image.features["levels"]:
            f = f + self.level_in(level)
        return self.out(f * self.sentence_in(text.global_feature)[:, :, None, None])


def ids() -> torch.Tensor:
    return torch.tensor([[5, 6, 7, 1, 0, 0], [8, 1, 0, 0, 0, 0], [9, 10, 11, 12, 13, 1]])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_global_feature_matches_timm_and_levels_match_forward_intermediates(variant):
    model = tiny_vit(**VARIANTS[variant]).eval()
    head = variant == "clip_head"
    tower = tower_from_timm_vit(model, image_layers=(0, -1), head=head)
    plain = tower_from_timm_vit(model, head=head)  # no levels: forward_features path
    x = images(3)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(x), pre_logits=not head)
        embedded = tower.embed(x)
        encoded = tower.encode(embedded)
        _, own_levels = model.forward_intermediates(x, indices=[0, 1])
        assert torch.equal(plain.encode(plain.embed(x)).global_feature, reference)
    assert torch.equal(encoded.global_feature, reference)  # bit for bit
    assert embedded.tokens.shape == (3, 16, WIDTH) and embedded.maskable.all() and embedded.grid == (4, 4)
    assert encoded.tokens.shape == (3, 16, 24 if head else WIDTH)
    assert all(torch.equal(a, b) for a, b in zip(encoded.features["levels"], own_levels, strict=True))
    assert encoded.features["prefix"].shape[1] == model.num_prefix_tokens


def test_encode_uses_only_the_embedded_tokens_and_masks_keep_positions():
    model = tiny_vit(reg_tokens=2).eval()
    tower = tower_from_timm_vit(model)
    a, b = images(2, seed=1), images(2, seed=2)
    with torch.no_grad():
        swapped = tower.embed(a).with_tokens(tower.embed(b).tokens)
        reference = model.forward_head(model.forward_features(b), pre_logits=True)
        assert torch.equal(tower.encode(swapped).global_feature, reference)
        embedded = tower.embed(a)
        tokens = embedded.tokens.clone()
        tokens[:, 0] = tokens[:, 9] = 0.3  # the same "mask token" at two patches
        out = tower.encode(embedded.with_tokens(tokens)).tokens
    assert not torch.allclose(out[:, 0], out[:, 9])  # position embeddings added after masking


def test_wrapped_training_step_prefix_tokens_never_masked_and_bit_identical_eval():
    model = tiny_vit(reg_tokens=2)
    tower = tower_from_timm_vit(model, image_layers=(1,))
    branches = dict(lmvsd=LMVSDConfig(top_k=1.0, ratio=1.0), vmlsd=VMLSDConfig(top_k=1.0, ratio=1.0))
    wrapper = MaskedSelfDistill(tower, TextTower(), Decoder(), **branches).train()
    target = torch.zeros(3, 4, 4)
    target[:, 1:3, 1:3] = 1
    out = wrapper(images(3), ids(), target, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    # every unit masked: exactly the 16 patches; class and register tokens are not embedded tokens
    assert out.selections["lmvsd"]["masked"].shape == (3, 16) and out.selections["lmvsd"]["masked"].all()
    out.loss.backward()
    for name, token in wrapper.added_parameters().items():
        assert token.grad is not None and token.grad.abs().sum() > 0, name
    assert model.cls_token.grad is not None and model.reg_token.grad is not None
    wrapper.eval()
    x = images(3, seed=4)
    with torch.no_grad():
        assert torch.equal(wrapper(x, ids()), wrapper.unwrap()(x, ids()))


def test_refusals_and_errors():
    with pytest.raises(TypeError, match="patch_drop_rate=0"):
        tower_from_timm_vit(tiny_vit(patch_drop_rate=0.5))
    with pytest.raises(TypeError, match="global_pool"):
        tower_from_timm_vit(tiny_vit(global_pool="map"))
    with pytest.raises(TypeError, match="global_pool"):
        tower_from_timm_vit(tiny_vit(global_pool=""))
    distilled = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=WIDTH, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="distilled"):
        tower_from_timm_vit(distilled)
    with pytest.raises(TypeError, match="VisionTransformer"):
        tower_from_timm_vit(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="VisionTransformer"):
        TimmViTImageTower(nn.Linear(2, 2))
    tower = tower_from_timm_vit(tiny_vit())
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        tower.embed(images(1, size=48))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        tower.embed(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="feature_layers"):
        tower_from_timm_vit(tiny_vit(), image_layers=(2,))
    # dynamic_img_size models take other sizes
    dynamic = tower_from_timm_vit(tiny_vit(dynamic_img_size=True))
    assert dynamic.embed(images(1, size=48)).grid == (6, 6)

"""``masksd.adapters.open_clip`` against real open_clip models (random init, no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from masksd import LMVSDConfig, MaskedSelfDistill, VMLSDConfig  # noqa: E402
from masksd.adapters.open_clip import (  # noqa: E402
    CLIP_EOT_TOKEN_ID,
    CLIP_PAD_TOKEN_ID,
    CLIP_SOT_TOKEN_ID,
    OpenCLIPImageTower,
    OpenCLIPResNetImageTower,
    OpenCLIPTextTower,
    towers_from_open_clip,
)

SENTENCES = ["the red dog on the left", "man", "a small cup next to the tall glass bottle"]
SPECIAL = (CLIP_SOT_TOKEN_ID, CLIP_EOT_TOKEN_ID, CLIP_PAD_TOKEN_ID)


def tiny_clip(context_length: int = 17, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
            text_cfg=dict(context_length=context_length, vocab_size=49408, width=32, heads=2, layers=2),
        )


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def vit_b16():
    """A real ViT-B/16 config at 96 px, random init (~150M parameters): built once."""
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=96)
    return model.eval()


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class ClipDecoder(nn.Module):
    """Uses projected image tokens, image levels, words (+ pad mask) and the sentence feature."""

    def __init__(self, width: int = 32, dim: int = 32, hidden: int = 16) -> None:
        super().__init__()
        self.tokens_in = nn.Linear(dim, hidden)
        self.level_in = nn.Conv2d(width, hidden, kernel_size=1)
        self.sentence_in = nn.Linear(dim, hidden)
        self.words_in = nn.Linear(width, hidden)
        self.out = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, image, text):
        gh, gw = image.features["grid"]
        x = self.tokens_in(image.tokens)  # [B, N, h]
        f = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
        for level in image.features["levels"]:
            f = f + self.level_in(level)
        f = f * torch.sigmoid(self.sentence_in(text.global_feature))[:, :, None, None]
        words = self.words_in(text.features["words"])  # [B, L, h]
        attn = torch.einsum("bchw,blc->bhwl", f, words)
        attn = attn.masked_fill(text.features["pad_mask"][:, None, None], float("-inf")).softmax(-1)
        f = f + torch.einsum("bhwl,blc->bchw", attn, words)
        return self.out(f)


# --------------------------------------------------------------------------- tiny CLIP


def test_image_tower_matches_encode_image_and_levels():
    clip = tiny_clip().eval()
    image_tower, _ = towers_from_open_clip(clip, image_layers=(0, -1))
    assert isinstance(image_tower, OpenCLIPImageTower) and image_tower.embed_dim == 32
    x = images(3)
    with torch.no_grad():
        embedded = image_tower.embed(x)
        encoded = image_tower.encode(embedded)
        reference = clip.encode_image(x)
    assert embedded.tokens.shape == (3, 16, 32) and embedded.maskable.all()
    assert torch.equal(encoded.global_feature, reference)
    assert encoded.tokens.shape == (3, 16, 32)
    levels = encoded.features["levels"]
    assert len(levels) == 2 and all(level.shape == (3, 32, 4, 4) for level in levels)
    assert encoded.features["grid"] == (4, 4)
    # no layers requested: no levels, same global feature
    plain = towers_from_open_clip(clip)[0]
    with torch.no_grad():
        assert torch.equal(plain.encode(plain.embed(x)).global_feature, reference)
        assert plain.encode(plain.embed(x)).features["levels"] == []


@pytest.mark.parametrize("context_length", [17, 77])
def test_text_tower_matches_encode_text(tokenizer, context_length):
    clip = tiny_clip(context_length).eval()
    _, text_tower = towers_from_open_clip(clip, text_layers=(1,))
    assert isinstance(text_tower, OpenCLIPTextTower) and text_tower.embed_dim == 32
    ids = tokenizer(SENTENCES, context_length=context_length)
    with torch.no_grad():
        embedded = text_tower.embed(ids)
        encoded = text_tower.encode(embedded)
        reference = clip.encode_text(ids)
    assert torch.equal(encoded.global_feature, reference)
    assert encoded.tokens.shape == (3, context_length, 32)
    assert encoded.features["words"].shape == (3, context_length, 32)
    assert torch.equal(encoded.features["pad_mask"], ids == CLIP_PAD_TOKEN_ID)
    assert encoded.features["levels"][0].shape == (3, context_length, 32)
    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(embedded.maskable, ~special)
    assert embedded.maskable.sum().item() == sum(len(tokenizer.encode(s)) for s in SENTENCES)


def test_short_ids_on_a_77_token_model(tokenizer):
    """RefCOCO-style 17-token ids on a context-77 CLIP: causal attention gives the same feature."""
    clip = tiny_clip(77).eval()
    _, text_tower = towers_from_open_clip(clip)
    full = tokenizer(SENTENCES, context_length=77)
    short = tokenizer(SENTENCES, context_length=17)
    assert torch.equal(full[:, :17], short)
    with torch.no_grad():
        short_feature = text_tower.encode(text_tower.embed(short)).global_feature
        reference = clip.encode_text(full)
    torch.testing.assert_close(short_feature, reference, atol=1e-5, rtol=1e-5)


def test_special_tokens_never_masked_in_training(tokenizer):
    clip = tiny_clip()
    image_tower, text_tower = towers_from_open_clip(clip)
    wrapper = MaskedSelfDistill(
        image_tower, text_tower, ClipDecoder(), vmlsd=VMLSDConfig(top_k=1.0, ratio=1.0)
    ).train()
    ids = tokenizer(SENTENCES, context_length=17)
    out = wrapper(images(3), ids, torch.zeros(3, 32, 32), generator=torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(out.selections["vmlsd"]["masked"], ~special)
    assert out.selections["lmvsd"]["masked"].shape == (3, 16)


def test_wrapped_training_step_gradients(tokenizer):
    clip = tiny_clip()
    image_tower, text_tower = towers_from_open_clip(clip, image_layers=(0,))
    decoder = ClipDecoder()
    wrapper = MaskedSelfDistill(image_tower, text_tower, decoder).train()
    ids = tokenizer(SENTENCES, context_length=17)
    target = torch.zeros(3, 32, 32)
    target[:, 8:24, 4:20] = 1
    out = wrapper(images(3), ids, target, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (3, 1, 4, 4)
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd"} and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [name for name, p in wrapper.named_parameters() if p.grad is None]
    assert not missing, missing
    # every CLIP parameter that the main forward uses is trained (logit_scale is not used)
    wrapped = {id(p) for p in wrapper.parameters()}
    unused = {name for name, p in clip.named_parameters() if id(p) not in wrapped}
    assert unused == {"logit_scale"}
    assert all(p.grad is not None for name, p in clip.named_parameters() if name != "logit_scale")
    assert set(wrapper.added_parameters()) == {"objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"}
    # towers share CLIP's parameters: nothing is copied
    assert wrapper.model.text_tower.token_embedding is clip.token_embedding
    assert wrapper.model.image_tower.visual is clip.visual


class LevelsWordsDecoder(nn.Module):
    """Reads only ``features["levels"]`` and ``features["words"]`` (issue 10's DDP failure)."""

    def __init__(self, width: int = 32, hidden: int = 16) -> None:
        super().__init__()
        self.level_in = nn.Conv2d(width, hidden, kernel_size=1)
        self.words_in = nn.Linear(width, hidden)
        self.out = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, image, text):
        f = sum(self.level_in(level) for level in image.features["levels"])  # [B, h, gh, gw]
        words = self.words_in(text.features["words"]).mean(1)  # [B, h]
        return self.out(f * words[:, :, None, None])  # [B, 1, gh, gw]


def test_check_names_projections_without_gradient_for_a_levels_words_decoder(tokenizer):
    """DDP with find_unused_parameters=False fails on these; the wrap-time check names them."""
    image_tower, text_tower = towers_from_open_clip(tiny_clip(), image_layers=(1,))  # the last layer
    wrapper = MaskedSelfDistill(image_tower, text_tower, LevelsWordsDecoder())
    ids = tokenizer(SENTENCES, context_length=17)
    target = torch.zeros(3, 32, 32)
    target[:, 8:24, 4:20] = 1
    report = wrapper.check(images(3), ids, target, generator=torch.Generator().manual_seed(0))
    # the projections into CLIP's joint space only feed the (detached) correlation scores
    assert sorted(report.no_grad) == [
        "model.image_tower.visual.ln_post.bias",
        "model.image_tower.visual.ln_post.weight",
        "model.image_tower.visual.proj",
        "model.text_tower.text_projection",
    ]
    text = str(report)
    assert "4 trainable parameter(s) got no gradient" in text and "find_unused_parameters=True" in text
    assert all(name in text for name in report.no_grad)


def test_layers_before_open_clip_2_32_are_refused_clearly(monkeypatch):
    """open_clip < 2.32 has no Transformer.forward_intermediates: say so instead of AttributeError."""
    clip = tiny_clip()
    monkeypatch.setattr(type(clip.transformer), "forward_intermediates", None)
    with pytest.raises(TypeError, match="open_clip_torch 2.32"):
        towers_from_open_clip(clip, image_layers=(0,))
    with pytest.raises(TypeError, match="open_clip_torch 2.32"):
        towers_from_open_clip(clip, text_layers=(0,))
    towers_from_open_clip(clip)  # no layers: works on older open_clip too


def test_adapter_errors(tokenizer):
    clip = tiny_clip()
    image_tower, text_tower = towers_from_open_clip(clip)
    with pytest.raises(ValueError, match="force_image_size"):
        image_tower.embed(images(1, size=48))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        image_tower.embed(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="context length"):
        text_tower.embed(tokenizer(["a cat"], context_length=18))
    with pytest.raises(ValueError, match="token ids"):
        text_tower.embed(torch.zeros(1, 17))
    with pytest.raises(ValueError, match="feature_layers"):
        towers_from_open_clip(clip, image_layers=(2,))
    with pytest.raises(TypeError, match="open_clip"):
        towers_from_open_clip(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="VisionTransformer"):
        OpenCLIPImageTower(nn.Linear(2, 2))


# ----------------------------------------------------------------------- ViT-B/16 at 96 px


def test_vit_b16_towers_match_clip(vit_b16, tokenizer):
    image_tower, text_tower = towers_from_open_clip(vit_b16, image_layers=(3, 7, 11))
    assert image_tower.embed_dim == 768 and text_tower.embed_dim == 512
    x = images(1, size=96)
    ids = tokenizer(["the dog on the left"])  # context 77
    with torch.no_grad():
        image = image_tower.encode(image_tower.embed(x))
        text = text_tower.encode(text_tower.embed(ids))
        assert torch.equal(image.global_feature, vit_b16.encode_image(x))
        assert torch.equal(text.global_feature, vit_b16.encode_text(ids))
    assert image.tokens.shape == (1, 36, 512)
    assert [tuple(level.shape) for level in image.features["levels"]] == [(1, 768, 6, 6)] * 3
    assert text.tokens.shape == (1, 77, 512)
    with pytest.raises(ValueError, match="force_image_size"):
        image_tower.embed(images(1, size=224))


# ------------------------------------------------------------------ ResNet CLIP (ModifiedResNet)


def tiny_resnet_clip(seed: int = 0) -> nn.Module:
    """RN-style CLIP at 64 px: stem width 8 at 16x16, layer4 256 channels at 2x2, 4 pool heads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=64, layers=(1, 1, 1, 1), width=8, head_width=64),
            text_cfg=dict(context_length=17, vocab_size=49408, width=32, heads=2, layers=2),
        )


class ResNetDecoder(nn.Module):
    """Dense CLIP tokens on the 2x2 unit grid + layer2/3/4 levels, gated by the sentence."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens_in = nn.Linear(32, 16)
        self.levels_in = nn.ModuleList(nn.Conv2d(c, 16, 1) for c in (64, 128, 256))
        self.sentence_in = nn.Linear(32, 16)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, image, text):
        gh, gw = image.features["grid"]
        f = self.tokens_in(image.tokens).transpose(1, 2).reshape(-1, 16, gh, gw)
        f = nn.functional.interpolate(f, scale_factor=4)
        for level, conv in zip(image.features["levels"], self.levels_in, strict=True):
            f = f + nn.functional.interpolate(conv(level), size=f.shape[-2:])
        return self.out(f * self.sentence_in(text.global_feature)[:, :, None, None])


def test_resnet_image_tower_matches_encode_image(tokenizer):
    clip = tiny_resnet_clip().eval()
    image_tower, text_tower = towers_from_open_clip(clip)  # ResNet CLIPs are no longer refused
    assert isinstance(image_tower, OpenCLIPResNetImageTower) and image_tower.embed_dim == 8
    x = images(3, size=64)
    with torch.no_grad():
        embedded = image_tower.embed(x)
        encoded = image_tower.encode(embedded)
        own = clip.visual.forward_intermediates(x, indices=[0, 2, 3, 4])["image_intermediates"]
        pool = clip.visual.attnpool
        dense = pool.c_proj(pool.v_proj(own[3].flatten(2).transpose(1, 2)))  # MaskCLIP
        assert torch.equal(encoded.global_feature, clip.encode_image(x))  # bit for bit
    # embedded = stem output (3 convs + avgpool) at H/4; encoded = the H/32 unit grid
    assert torch.equal(embedded.tokens, own[0].flatten(2).transpose(1, 2))
    assert embedded.grid == (16, 16) and embedded.maskable.all()
    assert encoded.grid == (2, 2) and encoded.features["grid"] == (2, 2)
    assert torch.equal(encoded.tokens, dense) and encoded.tokens.shape == (3, 4, 32)
    assert all(torch.equal(a, b) for a, b in zip(encoded.features["levels"], own[1:], strict=True))
    # the text tower of a ResNet CLIP is the standard one
    ids = tokenizer(SENTENCES, context_length=17)
    with torch.no_grad():
        assert torch.equal(text_tower.encode(text_tower.embed(ids)).global_feature, clip.encode_text(ids))
    # stages are selectable; encode uses only the embedded tokens (raw pixels play no part)
    only4 = towers_from_open_clip(clip, image_layers=(4,))[0]
    other = images(3, size=64, seed=9)
    with torch.no_grad():
        assert [tuple(t.shape) for t in only4.encode(only4.embed(x)).features["levels"]] == [(3, 256, 2, 2)]
        swapped = only4.encode(embedded.with_tokens(only4.embed(other).tokens))
        assert torch.equal(swapped.global_feature, clip.encode_image(other))


def test_resnet_masked_units_are_solid_stem_blocks(tokenizer):
    """Selection on the 2x2 unit grid; each masked unit replaces an 8x8 block of stem tokens."""
    clip = tiny_resnet_clip()
    image_tower, text_tower = towers_from_open_clip(clip)
    wrapper = MaskedSelfDistill(
        image_tower, text_tower, ResNetDecoder(), lmvsd=LMVSDConfig(top_k=1.0, ratio=0.5)
    ).train()
    seen = []
    original = image_tower.encode

    def spy(embedded):
        seen.append(embedded.tokens.detach().clone())
        return original(embedded)

    image_tower.encode = spy
    target = torch.zeros(3, 64, 64)
    target[:, 16:48, 8:40] = 1
    ids = tokenizer(SENTENCES, context_length=17)
    out = wrapper(images(3, size=64), ids, target, generator=torch.Generator().manual_seed(0))
    del image_tower.encode
    assert torch.isfinite(out.loss)
    masked_units = out.selections["lmvsd"]["masked"]
    assert masked_units.shape == (3, 4) and masked_units.sum(dim=1).tolist() == [2, 2, 2]
    main, branch = seen[0], seen[-1]  # main branch first, the LMVSD re-encode last
    token = wrapper.objectives["lmvsd"].mask_token.detach()
    replaced = (branch == token).all(dim=-1) & ~torch.isclose(main, branch).all(dim=-1)
    expected = masked_units.view(3, 1, 2, 2).float()
    expected = nn.functional.interpolate(expected, scale_factor=8).flatten(1).bool()
    assert torch.equal(replaced, expected)
    out.loss.backward()
    for name, parameter in wrapper.added_parameters().items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    wrapper.eval()
    with torch.no_grad():
        x = images(3, size=64, seed=3)
        assert torch.equal(wrapper(x, ids), wrapper.unwrap()(x, ids))


def test_resnet_errors():
    clip = tiny_resnet_clip()
    image_tower, _ = towers_from_open_clip(clip)
    with pytest.raises(ValueError, match=r"image_size"):
        image_tower.embed(images(1, size=96))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        image_tower.embed(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="stage numbers 1-4"):
        towers_from_open_clip(clip, image_layers=(5,))
    with pytest.raises(TypeError, match="ModifiedResNet"):
        OpenCLIPResNetImageTower(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ModifiedResNet"):
        OpenCLIPImageTower(clip.visual)  # the ViT tower points to the ResNet one

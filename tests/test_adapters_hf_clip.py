"""``masksd.adapters.hf_clip`` against a tiny random-init ``transformers.CLIPModel`` (no download)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from dense_checks import assert_dense_encoded  # noqa: E402
from hf_clip_models import (  # noqa: E402
    BOS,
    DIM,
    EOS,
    LENGTH,
    WIDTH,
    dense_reference,
    image_features,
    images,
    text_features,
    tiny_clip,
    tokenized,
)

from masksd import LMVSDConfig, MaskedSelfDistill, VMLSDConfig  # noqa: E402
from masksd.adapters.hf_clip import HFCLIPImageTower, HFCLIPTextTower, towers_from_hf_clip  # noqa: E402
from masksd.masking import select_top_k  # noqa: E402
from masksd.towers import scoring_tokens  # noqa: E402


class Decoder(nn.Module):
    """Projected patch tokens on the grid + levels, gated by the sentence, attending to words."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens_in = nn.Linear(DIM, 16)
        self.level_in = nn.Conv2d(WIDTH, 16, 1)
        self.sentence_in = nn.Linear(DIM, 16)
        self.words_in = nn.Linear(WIDTH, 16)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, image, text):
        gh, gw = image.features["grid"]
        f = self.tokens_in(image.tokens).transpose(1, 2).reshape(-1, 16, gh, gw)
        for level in image.features["levels"]:
            f = f + self.level_in(level)
        f = f * torch.sigmoid(self.sentence_in(text.global_feature))[:, :, None, None]
        words = self.words_in(text.features["words"])
        attn = torch.einsum("bchw,blc->bhwl", f, words)
        attn = attn.masked_fill(text.features["pad_mask"][:, None, None], float("-inf")).softmax(-1)
        return self.out(f + torch.einsum("bhwl,blc->bchw", attn, words))


def test_image_tower_matches_get_image_features_and_levels():
    model = tiny_clip().eval()
    tower, _ = towers_from_hf_clip(model, image_layers=(0, -1))
    assert isinstance(tower, HFCLIPImageTower) and tower.embed_dim == WIDTH
    x = images(3)
    with torch.no_grad():
        embedded = tower.embed(x)
        encoded = tower.encode(embedded)
        reference = image_features(model, x)
        hidden = model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        patches = model.vision_model.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
    # masking point: the patch conv's output, before class token and position embeddings
    assert torch.equal(embedded.tokens, patches) and embedded.maskable.all() and embedded.grid == (4, 4)
    assert torch.equal(encoded.global_feature, reference)  # bit for bit
    assert encoded.tokens.shape == (3, 16, DIM)
    levels = encoded.features["levels"]
    assert torch.equal(levels[0].flatten(2).transpose(1, 2), hidden[1][:, 1:])
    assert torch.equal(levels[1].flatten(2).transpose(1, 2), hidden[2][:, 1:])


def test_image_encode_uses_only_the_embedded_tokens():
    """Embedded tokens of image B with image A's raw pixels in extras give image B's feature."""
    model = tiny_clip().eval()
    tower, _ = towers_from_hf_clip(model)
    a, b = images(2, seed=1), images(2, seed=2)
    with torch.no_grad():
        swapped = tower.embed(a).with_tokens(tower.embed(b).tokens)
        assert torch.equal(tower.encode(swapped).global_feature, image_features(model, b))
        # a mask token keeps its position: the same vector at two patches encodes differently
        embedded = tower.embed(a)
        tokens = embedded.tokens.clone()
        tokens[:, 0] = tokens[:, 5] = 0.5
        out = tower.encode(embedded.with_tokens(tokens)).tokens
    assert not torch.allclose(out[:, 0], out[:, 5])


def test_interpolate_pos_encoding():
    model = tiny_clip().eval()
    if "interpolate_pos_encoding" not in inspect.signature(model.vision_model.forward).parameters:
        with pytest.raises(TypeError, match="4.46 or newer"):  # transformers < 4.46
            towers_from_hf_clip(model, interpolate_pos_encoding=True)
        return
    tower, _ = towers_from_hf_clip(model, interpolate_pos_encoding=True)
    x = images(2, size=48)
    with torch.no_grad():
        encoded = tower.encode(tower.embed(x))
        assert torch.equal(encoded.global_feature, image_features(model, x, interpolate_pos_encoding=True))
    assert encoded.features["grid"] == (6, 6) and encoded.tokens.shape == (2, 36, DIM)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        towers_from_hf_clip(model)[0].embed(x)


def test_text_tower_matches_get_text_features_and_maskable():
    model = tiny_clip().eval()
    _, tower = towers_from_hf_clip(model, text_layers=(1,))
    assert isinstance(tower, HFCLIPTextTower) and tower.embed_dim == WIDTH
    batch = tokenized()
    ids, attention = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        embedded = tower.embed(batch)
        encoded = tower.encode(embedded)
        assert torch.equal(encoded.global_feature, text_features(model, ids, attention))
        plain = tower.encode(tower.embed(ids))  # ids only, no attention mask
        assert torch.equal(plain.global_feature, text_features(model, ids))
    assert torch.equal(embedded.tokens, model.text_model.embeddings.token_embedding(ids))
    # maskable = the words only: not BOS, not the pooled EOS, not padding
    words = (attention.bool() & (ids != BOS) & (ids != EOS))
    assert torch.equal(embedded.maskable, words)
    assert embedded.maskable.sum(dim=1).tolist() == [3, 1, 6]
    assert torch.equal(encoded.features["pad_mask"], attention == 0)
    assert torch.equal(plain.features["pad_mask"], attention == 0)  # after the first EOS
    assert encoded.tokens.shape == (3, LENGTH, DIM)
    assert encoded.features["levels"][0].shape == (3, LENGTH, WIDTH)


def test_legacy_eos_id_pools_like_transformers():
    """Configs from before transformers PR #24773 (eos_token_id=2) pool at argmax(ids)."""
    model = tiny_clip(eos_token_id=2).eval()
    _, tower = towers_from_hf_clip(model)
    batch = tokenized()
    with torch.no_grad():
        embedded = tower.embed(batch)
        reference = text_features(model, batch["input_ids"], batch["attention_mask"])
        assert torch.equal(tower.encode(embedded).global_feature, reference)
    assert embedded.maskable.sum(dim=1).tolist() == [3, 1, 6]


def test_wrapped_training_step_and_bit_identical_eval():
    model = tiny_clip()
    image_tower, text_tower = towers_from_hf_clip(model, image_layers=(0,))
    wrapper = MaskedSelfDistill(
        image_tower, text_tower, Decoder(),
        lmvsd=LMVSDConfig(top_k=1.0, ratio=0.5), vmlsd=VMLSDConfig(top_k=1.0, ratio=1.0),
    ).train()
    batch = tokenized()
    target = torch.zeros(3, 32, 32)
    target[:, 4:20, 8:28] = 1
    out = wrapper(images(3), batch, target, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and set(out.losses) == {"seg", "lmvsd", "vmlsd"}
    # every word is masked (ratio 1): exactly the maskable words, never BOS/EOS/padding
    assert torch.equal(out.selections["vmlsd"]["masked"], text_tower.embed(batch).maskable)
    assert out.selections["lmvsd"]["masked"].sum(dim=1).tolist() == [8, 8, 8]
    out.loss.backward()
    for name, token in wrapper.added_parameters().items():
        assert token.grad is not None and token.grad.abs().sum() > 0, name
    assert model.vision_model.embeddings.position_embedding.weight.grad is not None
    wrapper.eval()
    x = images(3, seed=5)
    with torch.no_grad():
        assert torch.equal(wrapper(x, batch), wrapper.unwrap()(x, batch))


def test_errors_name_the_argument_and_the_fix():
    model = tiny_clip()
    image_tower, text_tower = towers_from_hf_clip(model)
    with pytest.raises(ValueError, match="pixel_values"):
        image_tower.embed(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="image_size 32"):
        image_tower.embed(images(1, size=40))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        text_tower.embed(torch.full((1, LENGTH + 1), EOS))
    with pytest.raises(ValueError, match="no EOS"):
        text_tower.embed(torch.tensor([[BOS, 320, 321]]))
    with pytest.raises(ValueError, match="input_ids"):
        text_tower.embed({"ids": torch.tensor([[BOS, EOS]])})
    with pytest.raises(ValueError, match="integer input_ids"):
        text_tower.embed(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        text_tower.embed({"input_ids": torch.tensor([[BOS, EOS]]), "attention_mask": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="feature_layers"):
        towers_from_hf_clip(model, image_layers=(2,))
    with pytest.raises(TypeError, match="CLIPModel"):
        towers_from_hf_clip(nn.Linear(2, 2))


# Dense-alignment scoring features (masksd.adapters.clip_dense), as for open_clip in test_dense_scorers.py


def count_module_calls(model: nn.Module) -> tuple[list[int], list]:
    """A one-element counter of forward calls of every submodule of ``model``, and the hook handles."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    return calls, [m.register_forward_hook(count) for m in model.modules()]


@pytest.mark.parametrize("vision", [dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4),
                                    dict(num_hidden_layers=3)])
@pytest.mark.parametrize("mode", ["value", "clearclip"])
def test_dense_scoring_features_match_a_hand_computation(mode, vision):
    model = tiny_clip(vision=vision).eval()
    tower, _ = towers_from_hf_clip(model, image_layers=(0,), dense=mode)
    plain_tower, _ = towers_from_hf_clip(model, image_layers=(0,))
    assert tower.dense == mode and plain_tower.dense is None
    x = images(3)
    with torch.no_grad():
        encoded = tower.encode(tower.embed(x))
        plain = plain_tower.encode(plain_tower.embed(x))
        expected = dense_reference(model, x, mode)
        assert torch.equal(encoded.global_feature, image_features(model, x))
    assert expected.shape == (3, 16, DIM)
    assert_dense_encoded(encoded, plain, expected)


@pytest.mark.parametrize("mode", ["value", "clearclip"])
def test_dense_scoring_leaves_the_output_alone_is_lazy_and_steers_the_selection(mode):
    batch, target = tokenized(), torch.zeros(3, 32, 32)
    target[:, 4:20, 8:28] = 1
    x = images(3)
    runs = {}
    for dense in (None, mode):
        model = tiny_clip()
        image_tower, text_tower = towers_from_hf_clip(model, image_layers=(0,), dense=dense)
        torch.manual_seed(1)
        wrapper = MaskedSelfDistill(image_tower, text_tower, Decoder(),
                                    lmvsd=LMVSDConfig(top_k=0.5), vmlsd=VMLSDConfig(top_k=0.5))
        calls, handles = count_module_calls(model)
        with torch.no_grad():
            eval_logits = wrapper.eval()(x, batch)
            image, text = wrapper.unwrap().encode(x, batch)
        eval_calls = calls[0]  # one eval forward and one encode
        if dense is not None:
            assert callable(image.scoring)  # not computed yet: nothing reads it at eval
            dense_tokens = scoring_tokens(image)
            assert calls[0] > eval_calls  # reading it runs the last layer's modules
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            out = wrapper.train()(x, batch, target, generator=torch.Generator().manual_seed(0))
        runs[dense] = (eval_logits, eval_calls, out, image, text)
    (eval_plain, calls_plain, out_plain, image, text), (eval_dense, calls_dense, out_dense, *_) = (
        runs[None], runs[mode])
    assert torch.equal(eval_plain, eval_dense) and calls_plain == calls_dense
    assert (torch.equal(out_plain.logits, out_dense.logits)
            and torch.equal(out_plain.losses["seg"], out_dense.losses["seg"]))
    # LMVSD keeps the top half of the patches under dense features · sentence feature
    all_patches = torch.ones(3, 16, dtype=torch.bool)
    dense_scores = torch.einsum("bd,bnd->bn", text.global_feature, dense_tokens)
    assert torch.equal(out_dense.selections["lmvsd"]["kept"],
                       select_top_k(dense_scores, all_patches, top_k=0.5))
    plain_scores = torch.einsum("bd,bnd->bn", text.global_feature, image.tokens)
    assert torch.equal(out_plain.selections["lmvsd"]["kept"],
                       select_top_k(plain_scores, all_patches, top_k=0.5))
    assert not torch.equal(out_plain.selections["lmvsd"]["kept"], out_dense.selections["lmvsd"]["kept"])
    assert torch.equal(out_plain.selections["vmlsd"]["kept"], out_dense.selections["vmlsd"]["kept"])


def test_dense_errors_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="dense must be one of .*got 'maskclip'"):
        towers_from_hf_clip(tiny_clip(), dense="maskclip")
    for breaks, missing in (
        (lambda layer: setattr(layer, "self_attn", nn.Identity()),
         "lacks self_attn.q_proj, self_attn.v_proj, self_attn.out_proj, self_attn.num_heads, "
         "self_attn.head_dim, self_attn.scale"),
        (lambda layer: delattr(layer, "layer_norm1"), "lacks layer_norm1"),
        (lambda layer: delattr(layer.self_attn, "scale"), "lacks self_attn.scale"),
        (lambda layer: setattr(layer.self_attn, "num_heads", 3),
         r"has self_attn.num_heads · head_dim = 3 · 16 \(not the width 32\)"),
    ):
        model = tiny_clip()
        breaks(model.vision_model.encoder.layers[-1])
        with pytest.raises(TypeError, match=f"dense: .*CLIPEncoderLayer {missing}; leave dense=None"):
            towers_from_hf_clip(model, dense="clearclip")
        towers_from_hf_clip(model)  # the plain tokens do not need them
    model = tiny_clip()
    model.vision_model.encoder.layers = nn.ModuleList()
    with pytest.raises(TypeError, match=r"dense: .*vision_model\.encoder\.layers"):
        HFCLIPImageTower(model, dense="value")

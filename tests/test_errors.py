"""What a new user gets wrong first: each mistake gives an error naming the culprit and the fix."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyDecoder, TinyImageTower, make_batch, make_model
from torch import nn

from masksd import DistillConfig, Embedded, LMVSDConfig, MaskedSelfDistill


def _batch():
    return make_batch(2, torch.Generator().manual_seed(0))


def test_embed_dim_that_does_not_match_the_embedded_width():
    image_tower, text_tower, decoder = make_model()
    image_tower.embed_dim = 24  # the tokens are 16 wide
    wrapper = MaskedSelfDistill(image_tower, text_tower, decoder).train()
    images, ids, target = _batch()
    with pytest.raises(ValueError, match=r"image_tower.embed_dim is 24 .* width 16"):
        wrapper(images, ids, target)


def test_embed_that_returns_a_tuple():
    class TupleTower(TinyImageTower):
        def embed(self, images):
            out = super().embed(images)
            return out.tokens, out.maskable

    _, text_tower, decoder = make_model()
    wrapper = MaskedSelfDistill(TupleTower(), text_tower, decoder).train()
    images, ids, target = _batch()
    with pytest.raises(TypeError, match=r"image_tower \(TupleTower\)\.embed must return masksd.Embedded.*tuple"):
        wrapper(images, ids, target)


@pytest.mark.parametrize("wrap_output", [lambda x: {"logits": x}, lambda x: [x]], ids=["dict", "list"])
def test_decoder_that_returns_a_container(wrap_output):
    class ContainerDecoder(TinyDecoder):
        def forward(self, image, text):
            return wrap_output(super().forward(image, text))

    image_tower, text_tower, _ = make_model()
    wrapper = MaskedSelfDistill(image_tower, text_tower, ContainerDecoder()).train()
    images, ids, target = _batch()
    with pytest.raises(TypeError, match=r"decoder \(ContainerDecoder\) must return a logits tensor"):
        wrapper(images, ids, target)


def test_image_and_text_batch_sizes_differ():
    wrapper = MaskedSelfDistill(*make_model()).train()
    images, ids, target = make_batch(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"different batch sizes \(3 vs 2\)"):
        wrapper(images, ids[:2], target)


def test_function_decoder_that_hides_parameters_is_refused():
    image_tower, text_tower, decoder = make_model()
    neck = nn.Linear(16, 16)

    def hidden(image, text):  # uses `decoder` and `neck` from the enclosing scope
        return decoder(image, text) + neck.bias.sum()

    with pytest.raises(TypeError, match=r"plain function.*decoder \(TinyDecoder\).*neck \(Linear\)"):
        MaskedSelfDistill(image_tower, text_tower, hidden)
    with pytest.raises(TypeError, match="plain function"):
        MaskedSelfDistill(image_tower, text_tower, lambda i, t: decoder(i, t))

    def parameter_free(image, text):  # a pure function is fine
        return torch.einsum("bnd,bd->bn", image.tokens, text.global_feature).view(-1, 1, 4, 4)

    wrapper = MaskedSelfDistill(image_tower, text_tower, parameter_free).train()
    images, ids, target = _batch()
    assert torch.isfinite(wrapper(images, ids, target).loss)


def test_check_names_parameters_that_get_no_gradient():
    class ImageOnlyDecoder(TinyDecoder):  # ignores the text tower's projection entirely
        def forward(self, image, text):
            return self.out(self.image_in(image.features["map"]))

    image_tower, text_tower, _ = make_model()
    wrapper = MaskedSelfDistill(image_tower, text_tower, ImageOnlyDecoder(), vmlsd=None)
    report = wrapper.check(*_batch())
    assert "model.text_tower.proj.weight" in report.no_grad
    assert report.ddp_find_unused_parameters
    assert "find_unused_parameters=True" in str(report)


def test_config_object_round_trips_and_excludes_duplicates():
    config = DistillConfig(lmvsd=LMVSDConfig(top_k=0.3, scorer="random"), vmlsd=None, hard_targets=True)
    assert DistillConfig.from_dict(config.to_dict()) == config
    wrapper = MaskedSelfDistill(*make_model(), config=config)
    assert wrapper.config == config and set(wrapper.objectives) == {"lmvsd"}
    with pytest.raises(TypeError, match="either config= or"):
        MaskedSelfDistill(*make_model(), config=config, hard_targets=False, vmlsd=None, seg_weight=2.0)
    with pytest.raises(ValueError, match="unknown DistillConfig keys"):
        DistillConfig.from_dict({"lmvsd_ratio": 0.1})


def test_embedded_is_validated():
    with pytest.raises(TypeError, match="maskable must be a bool"):
        Embedded(tokens=torch.zeros(1, 2, 3), maskable=torch.ones(1, 2))
    with pytest.raises(ValueError, match="grid"):
        Embedded(tokens=torch.zeros(1, 6, 3), maskable=torch.ones(1, 6, dtype=torch.bool), grid=(2, 2))

"""What a new user gets wrong first: each mistake gives an error naming the culprit and the fix."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyDecoder, TinyImageTower, make_batch, make_model
from torch import nn

import masksd.towers as tower_backend
from masksd import DistillConfig, LMVSDConfig, MaskedSelfDistill
from masksd.towers import Embedded, RISModel

GLOBAL_PARTS: list[nn.Module] = []  # a module-level list a decoder function reads (hidden from the wrapper)

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
    with pytest.raises(
        TypeError, match=r"image_tower \(TupleTower\)\.embed must return masksd.towers.Embedded.*tuple"
    ):
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
    with pytest.raises(ValueError, match=r"different batch sizes \('images'.* 3, 'texts'.* 2\)"):
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


def _parameter_count(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,} parameters"


class CallableDecoder:  # not an nn.Module: its attribute is invisible to the wrapper
    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder

    def __call__(self, image, text):
        return self.decoder(image, text)


def _dict_closure(decoder: nn.Module):
    parts = {"dec": decoder}

    def decode(image, text):
        return parts["dec"](image, text)

    return decode


def _global_list(decoder: nn.Module):
    GLOBAL_PARTS[:] = [decoder]

    def decode(image, text):
        return GLOBAL_PARTS[0](image, text)

    return decode


@pytest.mark.parametrize("hide", [CallableDecoder, _dict_closure, _global_list],
                         ids=["callable-object", "dict-closure", "global-list"])
def test_decoder_that_hides_parameters_from_the_static_check_is_refused_at_the_first_step(hide):
    image_tower, text_tower, decoder = make_model()
    wrapper = MaskedSelfDistill(image_tower, text_tower, hide(decoder)).train()  # passes the static check
    assert not any(p is q for p in wrapper.parameters() for q in decoder.parameters())
    expected = rf"TinyDecoder \({_parameter_count(decoder)}\).*Pass an nn.Module as decoder.*nn.ModuleDict"
    for _ in range(2):  # refused again, not only once
        with pytest.raises(ValueError, match=expected):
            wrapper(*_batch())
        with pytest.raises(ValueError, match=expected):
            wrapper.check(*_batch())


def test_raw_parameter_in_a_dict_is_refused():
    image_tower, text_tower, decoder = make_model()
    extra = {"bias": nn.Parameter(torch.zeros(1))}
    wrapper = MaskedSelfDistill(image_tower, text_tower, _DictBiasDecoder(decoder, extra)).train()
    with pytest.raises(ValueError, match=r"nn.Parameter of shape \[1\] \(1 values\)"):
        wrapper(*_batch())


class _DictBiasDecoder(nn.Module):
    """An nn.Module decoder that keeps one raw parameter in a plain dict (hidden, used functionally)."""

    def __init__(self, decoder: nn.Module, extra: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.decoder, self.extra = decoder, extra

    def forward(self, image, text):
        return self.decoder(image, text) + self.extra["bias"]


def test_module_decoders_pass_and_the_runtime_check_runs_once(monkeypatch):
    class Holder(nn.Module):  # submodules in an nn.ModuleDict, a frozen helper outside the wrapper
        def __init__(self, decoder: nn.Module, helper: nn.Module) -> None:
            super().__init__()
            self.parts = nn.ModuleDict({"dec": decoder})
            self._helper = [helper.requires_grad_(False)]  # frozen: allowed

        def forward(self, image, text):
            return self.parts["dec"](image, text) + self._helper[0](torch.zeros(1, 1))

    calls = []
    register = tower_backend.register_module_forward_pre_hook
    monkeypatch.setattr(tower_backend, "register_module_forward_pre_hook",
                        lambda hook: calls.append(hook) or register(hook))
    image_tower, text_tower, decoder = make_model()
    for model in (
        (image_tower, text_tower, decoder),
        (image_tower, text_tower, Holder(decoder, nn.Linear(1, 1))),
    ):
        wrapper = MaskedSelfDistill(*model).train()
        for _ in range(3):
            out = wrapper(*_batch())
            out.loss.backward()
        assert torch.isfinite(out.loss)
    assert len(calls) == 2  # the first training step of each wrapper only


def test_eval_batch_sizes_differ():
    wrapper = MaskedSelfDistill(*make_model()).eval()
    images, ids, _ = make_batch(3, torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(ValueError, match=r"different batch sizes \(3 vs 2\)"):
        wrapper(images, ids[:2])
    with torch.no_grad(), pytest.raises(ValueError, match=r"different batch sizes \(3 vs 2\)"):
        RISModel(*make_model())(images, ids[:2])


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

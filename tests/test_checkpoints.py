"""``masksd.checkpoints``: training checkpoint → bare model, → open_clip CLIP, training-only part."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_batch, make_model
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from masksd import MaskedSelfDistill
from masksd.checkpoints import (
    added_state_dict,
    bare_state_dict,
    load_bare_state_dict,
    open_clip_state_dict,
    split_training_state_dict,
)
from masksd.towers import RISModel


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Move every parameter away from its initial value (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def _trained_wrapper(**kwargs) -> MaskedSelfDistill:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        wrapper = MaskedSelfDistill(*make_model(0, **kwargs))
    return _perturbed(wrapper, 1)


# ----------------------------------------------------------------------------- bare model


def test_training_checkpoint_loads_strictly_into_a_fresh_bare_model():
    wrapper = _trained_wrapper()
    training = wrapper.state_dict()
    bare, added = split_training_state_dict(training)
    assert bare.keys() == wrapper.unwrap().state_dict().keys()
    assert set(added) == {"objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"}
    assert added_state_dict(training).keys() == added.keys()
    assert bare_state_dict(training).keys() == bare.keys()

    fresh = RISModel(*make_model(3))  # other initial weights
    images, ids, _ = make_batch(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(images, ids), wrapper.eval()(images, ids))
        result = load_bare_state_dict(fresh, training)
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(fresh(images, ids), wrapper(images, ids))
    # a wrapper is unwrapped first
    other = MaskedSelfDistill(*make_model(4))
    load_bare_state_dict(other, training)
    assert all(torch.equal(a, b) for a, b in zip(other.unwrap().state_dict().values(), bare.values()))


def test_added_state_dict_matches_the_wrapper_method():
    wrapper = _trained_wrapper()
    expected = wrapper.added_state_dict()
    got = added_state_dict(wrapper.state_dict())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_bare_state_dict_where_a_training_one_is_expected_is_refused():
    wrapper = _trained_wrapper()
    bare = wrapper.unwrap().state_dict()
    with pytest.raises(ValueError, match=r"looks like a bare model's state dict already.*load_state_dict"):
        bare_state_dict(bare)
    with pytest.raises(ValueError, match="image_tower.patch.weight"):  # the message lists keys
        load_bare_state_dict(RISModel(*make_model(3)), bare)


@pytest.mark.parametrize("strict", [True, False])
def test_bare_model_load_state_dict_refuses_a_training_state_dict(strict):
    """``strict=False`` used to load nothing (every key unexpected), silently."""
    wrapper = _trained_wrapper()
    fresh = RISModel(*make_model(3))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"training state dict.*'model.image_tower.*load_bare_state_dict"):
        fresh.load_state_dict(wrapper.state_dict(), strict=strict)
    with pytest.raises(ValueError, match="load_bare_state_dict"):  # the training-only part alone
        fresh.load_state_dict(wrapper.added_state_dict(), strict=False)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    # the wrapper itself (RISModel under 'model.') and the bare state dict still load
    MaskedSelfDistill(*make_model(4)).load_state_dict(wrapper.state_dict())
    fresh.load_state_dict(wrapper.unwrap().state_dict())
    assert all(torch.equal(a, b)
               for a, b in zip(fresh.state_dict().values(), wrapper.unwrap().state_dict().values()))


def test_other_wrong_inputs_name_the_fix():
    wrapper = _trained_wrapper()
    training = wrapper.state_dict()
    with pytest.raises(TypeError, match=r"whole checkpoint file: pass training_state_dict\['model'\]"):
        bare_state_dict({"model": training, "epoch": 3})
    with pytest.raises(ValueError, match="DistributedDataParallel.*consume_prefix_in_state_dict_if_present"):
        bare_state_dict({f"module.{k}": v for k, v in training.items()})
    # a LightningModule's checkpoint["state_dict"]
    held = {f"lit.wrapper.{k}": v for k, v in training.items()}
    with pytest.raises(ValueError, match=r"starts with 'lit\.wrapper\.' followed by the wrapper's own keys.*"
                                         r"consume_prefix_in_state_dict_if_present\(state, "
                                         r"'lit\.wrapper\.'\)"):
        bare_state_dict(held)
    consume_prefix_in_state_dict_if_present(held, "lit.wrapper.")
    assert bare_state_dict(held).keys() == wrapper.unwrap().state_dict().keys()
    own_model_submodule = {f"net.model.{k}": v for k, v in wrapper.unwrap().state_dict().items()}
    # no objectives.*: not a wrapper
    with pytest.raises(ValueError, match="looks like a bare model's state dict"):
        bare_state_dict(own_model_submodule)
    with pytest.raises(ValueError, match="only training-only entries"):
        bare_state_dict(wrapper.added_state_dict())
    with pytest.raises(ValueError, match="mixes wrapper keys"):
        bare_state_dict({**training, "epoch_counter": torch.tensor(3)})
    with pytest.raises(TypeError, match="torch.load"):
        bare_state_dict("runs/best.pt")  # type: ignore[arg-type]


def test_strict_load_lists_mismatching_keys():
    training = _trained_wrapper().state_dict()
    with_bn = RISModel(*make_model(0, batch_norm=True))  # a decoder with a BatchNorm: more keys
    with pytest.raises(ValueError,
                       match=r"lacks 5 of the model's keys: 'decoder.bn.bias'.*'decoder.bn.weight'"):
        load_bare_state_dict(with_bn, training)
    result = load_bare_state_dict(with_bn, training, strict=False)
    assert "decoder.bn.weight" in result.missing_keys and not result.unexpected_keys


# ----------------------------------------------------------------------------- open_clip

open_clip = pytest.importorskip("open_clip")


def _tiny_clip(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
            text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1),
        )


class _DotDecoder(nn.Module):
    """Per-patch logits: projected patch tokens · projected sentence."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Linear(dim, dim)
        self.sentence = nn.Linear(dim, dim)

    def forward(self, image, text):
        gh, gw = image.features["grid"]
        scores = torch.einsum("bnd,bd->bn", self.patch(image.tokens), self.sentence(text.global_feature))
        return scores.view(-1, 1, gh, gw)


def _clip_inputs():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = open_clip.get_tokenizer("ViT-B-16")(["the red dog", "a cup on the left"], context_length=12)
    return images, texts


def _clip_wrapper(clip: nn.Module) -> MaskedSelfDistill:
    from masksd.adapters.open_clip import towers_from_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return MaskedSelfDistill(*towers_from_open_clip(clip), _DotDecoder())


def test_training_checkpoint_to_open_clip_clip_loads_strictly():
    clip = _tiny_clip(0)
    wrapper = _perturbed(_clip_wrapper(clip), 2)  # trains the CLIP's own parameters too
    training = wrapper.state_dict()

    converted = open_clip_state_dict(training, wrapper, clip)
    assert converted.keys() == clip.state_dict().keys()
    assert torch.equal(converted["visual.conv1.weight"], training["model.image_tower.visual.conv1.weight"])
    assert torch.equal(converted["token_embedding.weight"],
                       training["model.text_tower.token_embedding.weight"])
    assert torch.equal(converted["logit_scale"], clip.logit_scale.detach())  # not held by the towers

    fresh = _tiny_clip(5).eval()
    images, texts = _clip_inputs()
    clip.eval()
    with torch.no_grad():
        assert not torch.equal(fresh.encode_image(images), clip.encode_image(images))
        fresh.load_state_dict(converted, strict=True)
        assert torch.equal(fresh.encode_image(images), clip.encode_image(images))
        assert torch.equal(fresh.encode_text(texts), clip.encode_text(texts))

    # the mapping needs only a model of the same configuration built on *a* CLIP: the conversion
    # can run in a fresh process with fresh weights
    template_clip = _tiny_clip(9)
    template = _clip_wrapper(template_clip).unwrap()
    again = open_clip_state_dict(training, template, template_clip)
    assert all(torch.equal(again[k], converted[k]) for k in converted if k != "logit_scale")


def test_open_clip_state_dict_refuses_unrelated_clip_and_unheld_keys():
    clip = _tiny_clip(0)
    wrapper = _clip_wrapper(clip)
    training = wrapper.state_dict()
    with pytest.raises(ValueError, match="shares no tensor with clip"):
        open_clip_state_dict(training, wrapper, _tiny_clip(1))
    with pytest.raises(ValueError, match=r"not held by model: 'logit_scale'.*fill_from_clip"):
        open_clip_state_dict(training, wrapper, clip, fill_from_clip=())
    with pytest.raises(ValueError, match="looks like a bare model's state dict"):
        open_clip_state_dict(clip.state_dict(), wrapper, clip)

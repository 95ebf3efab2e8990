"""``MaskGrounding`` (MagNet): loss, word masking, tying, leak safety, gradients, both backends."""

from __future__ import annotations

import dataclasses
import math

import hook_models
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from objective_models import (
    WIDTH,
    all_objectives,
    assert_all_grads,
    fused_spec,
    hooks_batch,
    hooks_wrapper,
    towers_batch,
    towers_wrapper,
    train_step,
)
from torch import nn

from masksd import Maskable
from masksd.objectives import MaskGrounding, MaskGroundingConfig
from masksd.objectives._common import trailing_padding
from masksd.objectives.mask_grounding import mask_centers, select_words

SMALL = dict(width=16, layers=1, heads=2, ffn=32, dropout=0.0)


def grounding(**config) -> MaskGrounding:
    torch.manual_seed(3)
    return MaskGrounding(word_dim=WIDTH, text_dim=WIDTH, image_dim=WIDTH,
                         config=MaskGroundingConfig(**{**SMALL, **config}))


def capture_head(objective: MaskGrounding) -> list:
    """Record ``(hidden, word_embedding, logits)`` of every head call."""
    calls: list = []
    objective.head.register_forward_hook(lambda module, args, out: calls.append((args[0], args[1], out)))
    return calls


BACKENDS = {
    "towers": (towers_wrapper, towers_batch, lambda w: w.unwrap().text_tower.token_embedding.weight),
    "hooks": (hooks_wrapper, hooks_batch, lambda w: w.unwrap().word_embed.weight),
}


# --------------------------------------------------------------------------------- the loss


def test_uniform_logits_give_log_vocabulary():
    """Hand-computed: with a zero word table every logit is 0, so each CE is ln V (V = 50)."""
    mg = grounding()
    wrapper = towers_wrapper([mg], lmvsd=None, vmlsd=None)
    with torch.no_grad():
        wrapper.unwrap().text_tower.token_embedding.weight.zero_()
    out = train_step(wrapper, towers_batch())
    assert int(out.selections["mask_grounding"]["masked"].sum()) > 0
    torch.testing.assert_close(out.losses["mask_grounding"], torch.tensor(math.log(tiny_models.VOCAB)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_is_the_mean_cross_entropy_of_the_tied_head(backend):
    build, batch, table = BACKENDS[backend]
    mg = grounding()
    calls = capture_head(mg)
    wrapper = build([mg])
    images, ids, target = batch()
    out = train_step(wrapper, (images, ids, target))
    hidden, weight, logits = calls[-1]
    head = mg.head
    manual = F.layer_norm(F.gelu(hidden @ head.dense.weight.T + head.dense.bias), (WIDTH,),
                          head.norm.weight, head.norm.bias) @ table(wrapper).T
    torch.testing.assert_close(logits, manual)
    selected = out.selections["mask_grounding"]["masked"]
    labels = ids[selected]
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels].mean()
    torch.testing.assert_close(out.losses["mask_grounding"], expected)
    info = out.selections["mask_grounding"]
    assert torch.equal(info["predictions"][selected], logits.argmax(1))
    assert (info["predictions"][~selected] == -1).all()
    torch.testing.assert_close(out.loss, out.losses["seg"] + 0.75 * out.losses["lmvsd"]
                               + 0.1 * out.losses["vmlsd"] + 0.1 * out.losses["mask_grounding"])


def test_mask_centers_closed_form_and_empty_mask():
    target = torch.zeros(3, 16, 16)
    target[0, 2:6, 4:10] = 1  # rows 2-5, cols 4-9
    target[1, 0:2, 0:8] = 1  # an L: 16 pixels on top, 8 below on the left
    target[1, 2:10, 0:1] = 1
    centers, present = mask_centers(target, "centroid")
    torch.testing.assert_close(centers[0], torch.tensor([7 / 16, 4 / 16]))
    torch.testing.assert_close(centers[1], torch.tensor([(16 * 4 + 8 * 0.5) / 24 / 16,
                                                         (16 * 1 + 8 * 6) / 24 / 16]))
    assert present.tolist() == [True, True, False] and torch.equal(centers[2], torch.zeros(2))
    box, _ = mask_centers(target, "box")
    torch.testing.assert_close(box[0], centers[0])  # a rectangle: both agree
    torch.testing.assert_close(box[1], torch.tensor([4 / 16, 5 / 16]))  # cols 0-7, rows 0-9
    assert torch.isfinite(box).all()


# ------------------------------------------------------------------------------ tying, leak


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_layer_is_the_models_embedding_matrix(backend):
    build, batch, table = BACKENDS[backend]
    mg = grounding()
    calls = capture_head(mg)
    wrapper = build([mg])
    out = train_step(wrapper, batch())
    _, weight, logits = calls[-1]
    assert weight is table(wrapper) and weight.data_ptr() == table(wrapper).data_ptr()
    model_ids = {id(p) for p in wrapper.unwrap().parameters()}
    model_ptrs = {p.data_ptr() for p in wrapper.unwrap().parameters()}
    added = wrapper.added_parameters()
    assert not any(id(p) in model_ids or p.data_ptr() in model_ptrs for p in added.values())
    assert not any(p.shape == table(wrapper).shape for p in added.values())
    assert not any(k.endswith(("token_embedding.weight", "word_embed.weight"))
                   for k in wrapper.added_state_dict())
    (grad,) = torch.autograd.grad(logits.sum(), table(wrapper), retain_graph=True)
    assert grad.abs().sum() > 0  # the word table is trained through the head
    out.loss.backward()


@pytest.mark.parametrize("backend", ["towers", "hooks", "hooks_early_fusion"])
def test_changing_a_masked_words_id_does_not_change_its_logits(backend):
    """Leak test: the selected words are replaced before encoding, so their original ids are invisible."""
    if backend == "hooks_early_fusion":
        # image features depend on the text: they must come from the masked pass
        def build(objectives):
            return hooks_wrapper(objectives, model_cls=hook_models.EarlyFusionRIS,
                                 spec=hook_models.early_spec(), lmvsd=None, vmlsd=None)
        batch = hooks_batch
    else:
        build, batch, _ = BACKENDS[backend]
        build = (lambda b: lambda objectives: b(objectives, lmvsd=None, vmlsd=None))(build)
    mg = grounding(p_mask=1.0, ratio=0.5)
    calls = capture_head(mg)
    wrapper = build([mg])
    images, ids, target = batch()
    first = train_step(wrapper, (images, ids, target), seed=5)
    selected = first.selections["mask_grounding"]["masked"]
    assert torch.equal(selected, first.selections["mask_grounding"]["replaced"])
    b, position = (int(v) for v in selected.nonzero()[0])
    changed = ids.clone()
    changed[b, position] = 3 + (int(ids[b, position]) - 3 + 7) % 40  # another ordinary word
    second = train_step(wrapper, (images, changed, target), seed=5)
    assert torch.equal(second.selections["mask_grounding"]["masked"], selected)
    assert torch.equal(calls[0][2], calls[1][2]), "the logits saw the original id"
    assert not torch.equal(first.logits, second.logits)  # the main branch did see the change


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_changes_the_masked_words_logits(backend):
    """The predictor masks the text's padding as keys: noise in the text features at padding
    positions (towers: the tower's pad mask; hooks: derived from the ids) leaves the logits as they are."""
    build, batch, _ = BACKENDS[backend]
    mg = grounding(ratio=0.5)
    calls = capture_head(mg)
    wrapper = build([mg], lmvsd=None, vmlsd=None)
    images, ids, target = batch()
    pad = ids == 0  # both tiny models pad with id 0
    assert pad.any() and (~pad).any()
    noise = {"scale": 0.0,
             "values": torch.randn(*ids.shape, WIDTH, generator=torch.Generator().manual_seed(9))}
    if backend == "towers":
        tower = wrapper.unwrap().text_tower
        encode = tower.encode

        def noisy_encode(embedded):
            encoded = encode(embedded)
            where = encoded.features["pad_mask"][..., None]
            return dataclasses.replace(encoded,
                                       tokens=encoded.tokens + where * noise["scale"] * noise["values"])

        tower.encode = noisy_encode
    else:
        def noisy_output(module, args, output):
            return output + pad[..., None] * noise["scale"] * noise["values"]

        wrapper.unwrap().text_encoder.register_forward_hook(noisy_output, prepend=True)  # before masksd's tap
    first = train_step(wrapper, (images, ids, target), seed=3)
    noise["scale"] = 5.0
    second = train_step(wrapper, (images, ids, target), seed=3)
    selected = first.selections["mask_grounding"]["masked"]
    assert selected.any() and torch.equal(second.selections["mask_grounding"]["masked"], selected)
    torch.testing.assert_close(calls[1][2], calls[0][2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second.losses["mask_grounding"], first.losses["mask_grounding"])


def test_trailing_padding_rule():
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 5, 6, 7, 8, 2], [5, 6, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                        [1, 5, 2, 2, 2, 2]])
    maskable = (ids > 2)
    expected = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1], [1] * 6,
                             [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(trailing_padding(ids, maskable), expected)  # a full row's EOT counts as padding


# ------------------------------------------------------------------------- word masking


@st.composite
def sentences(draw):
    batch = draw(st.integers(1, 6))
    length = draw(st.integers(2, 12))
    rows = []
    for _ in range(batch):
        words = draw(st.integers(0, length - 2))
        row = [1] + draw(st.lists(st.integers(3, 49), min_size=words, max_size=words)) + [2]
        rows.append(row + [0] * (length - len(row)))
    return torch.tensor(rows)


@settings(max_examples=150, deadline=None)
@given(ids=sentences(), ratio=st.floats(0.0, 1.0), min_masked=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_select_words_counts_and_never_specials(ids, ratio, min_masked, seed):
    maskable = ids > 2
    selected = select_words(maskable, ratio=ratio, min_masked=min_masked,
                            generator=torch.Generator().manual_seed(seed))
    assert not (selected & ~maskable).any()  # never PAD/SOT/EOT
    n = maskable.sum(1)
    m = selected.sum(1)
    floor = torch.maximum(torch.clamp(n, max=min_masked), torch.floor(n * ratio).long())
    ceil = torch.maximum(torch.clamp(n, max=min_masked), torch.ceil(n * ratio - 1e-9).long())
    assert ((m == floor) | (m == ceil)).all()
    if min_masked >= 1:
        assert (m[n > 0] >= 1).all()  # at least one word per sentence that has one


def test_select_words_mean_count_and_replacement_share():
    maskable = torch.zeros(4000, 9, dtype=torch.bool)
    maskable[:, 1:8] = True  # n = 7: 0.15 · 7 = 1.05
    mg = grounding()
    from masksd.step import Step, View, units_of
    from masksd.towers import Embedded
    words = Embedded(torch.zeros(4000, 9, 1), maskable)
    step = Step(model=nn.Identity(), logits=torch.zeros(1), raw_logits=torch.zeros(1), target=None,
                generator=torch.Generator().manual_seed(0),
                views={"text": View(embedded=words, encoded=None, units=units_of("text", words, None))})
    selected, replaced = mg.select(step)
    m = selected.sum(1).float()
    assert abs(m.mean().item() - 1.05) < 3 * math.sqrt(0.05 * 0.95 / 4000)  # E[max(1, SR(1.05))] = 1.05
    share = replaced.sum() / selected.sum()
    assert abs(share.item() - 0.9) < 3 * math.sqrt(0.9 * 0.1 / selected.sum().item())
    assert not (replaced & ~selected).any()


# ------------------------------------------------------------------- gradients, eval, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_added_parameter_gets_a_gradient_even_with_nothing_to_predict(backend):
    build, batch, _ = BACKENDS[backend]
    wrapper = build([grounding(ratio=0.0, min_masked=0)])
    images, ids, target = batch()
    target = torch.zeros_like(target)  # empty masks too: the "no mask" vector is used
    out = train_step(wrapper, (images, ids, target))
    assert int(out.selections["mask_grounding"]["masked"].sum()) == 0
    assert out.losses["mask_grounding"] == 0
    out.loss.backward()
    assert_all_grads(wrapper)
    # word-less but not empty sentences (SOT, EOT, padding): nothing maskable, nothing to predict
    only_specials = torch.tensor([[1, 2] + [0] * (ids.shape[1] - 2)] * ids.shape[0])
    options = {} if backend == "towers" else {"spec": fused_spec(text=dataclasses.replace(
        fused_spec().text, maskable=Maskable(ids="ids", never=(0, 1, 2))))}  # TinyRIS: 1, 2 as SOT, EOT
    wrapper = build([grounding()], vmlsd=None, **options)
    out = train_step(wrapper, (images, only_specials, batch()[2]))
    assert int(out.selections["mask_grounding"]["masked"].sum()) == 0 and out.losses["mask_grounding"] == 0
    out.loss.backward()
    assert_all_grads(wrapper)


def test_eval_is_the_bare_model_and_heads_are_saved_apart():
    wrapper = towers_wrapper(all_objectives())
    images, ids, target = towers_batch()
    train_step(wrapper, (images, ids, target)).loss.backward()
    wrapper.eval()
    with torch.no_grad():
        assert torch.equal(wrapper(images, ids), wrapper.unwrap()(images, ids))
    assert not any(k.startswith("objectives") for k in wrapper.unwrap().state_dict())
    added = wrapper.added_state_dict()
    assert "objectives.mask_grounding.mask_token" in added and "objectives.lang_rec.queries" in added
    assert set(wrapper.added_parameters()) == {k for k in added if k in dict(wrapper.named_parameters())}


@tiny_models.requires_bf16_masked_attention
def test_bf16_autocast_is_finite():
    wrapper = towers_wrapper([grounding()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_step(wrapper, towers_batch())
    assert out.losses["mask_grounding"].dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert_all_grads(wrapper)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [({"ratio": 1.5}, ValueError, "ratio"), ({"p_mask": -0.1}, ValueError, "p_mask"),
     ({"weight": -1}, ValueError, "weight"), ({"min_masked": 1.0}, TypeError, "min_masked"),
     ({"mask_input": "box"}, ValueError, "mask_input"), ({"center": "middle"}, ValueError, "center"),
     ({"width": 10, "heads": 4}, ValueError, "divisible"), ({"dropout": 1.0}, ValueError, "dropout")],
)
def test_bad_configs(config, error, match):
    with pytest.raises(error, match=match):
        MaskGroundingConfig(**config)


def test_missing_capabilities_are_named():
    class NoIds(tiny_models.TinyTextTower):
        def embed(self, ids):
            embedded = super().embed(ids)
            embedded.extras["word_ids"] = embedded.extras.pop("ids")
            return embedded

        def encode(self, embedded):
            return super().encode(dataclasses.replace(embedded, extras={"ids": embedded.extras["word_ids"]}))

    wrapper = towers_wrapper([grounding()])
    wrapper.model.text_tower.__class__ = NoIds
    with pytest.raises(TypeError, match=r"extras\['ids'\].*token_ids"):
        train_step(wrapper, towers_batch())
    with pytest.raises(ValueError, match="text_dim=16"):
        train_step(towers_wrapper([MaskGrounding(word_dim=16, text_dim=8, image_dim=16)]), towers_batch())
    with pytest.raises(ValueError, match="ground-truth"):
        towers_wrapper([grounding()]).train()(*towers_batch()[:2], target=None)
    spec = hook_models.tiny_spec(text=hook_models.tiny_spec().text.__class__(
        embed="text_encoder.layers.0.norm1", maskable=hook_models.tiny_spec().text.maskable,
        tokens=hook_models.tiny_spec().text.tokens))
    with pytest.raises(TypeError, match="not an nn.Embedding"):
        train_step(hooks_wrapper([grounding()], spec=spec, vmlsd=None, lmvsd=None), hooks_batch())


def test_hooks_features_pass_stops_before_the_decoder():
    mg = grounding()
    wrapper = hooks_wrapper([mg], lmvsd=None, vmlsd=None)
    calls = []
    wrapper.unwrap().decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    train_step(wrapper, hooks_batch())  # includes the one-off fusion probe
    calls.clear()
    train_step(wrapper, hooks_batch())
    assert len(calls) == 1  # the main branch only: Mask Grounding's text pass ends at its taps

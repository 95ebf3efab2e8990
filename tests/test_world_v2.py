"""World v2 (examples/cris_clip/world_v2.py) and its dense CLIP pretraining (pretrain_dense.py):
what issue 16 asks of the testbed — large referents among same-category objects, short
expressions that name exactly their target, the compositional split, determinism."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from examples.cris_clip import roles, synthetic, world_v2  # noqa: E402

_NP = r"(?:(small|large) )?(?:(red|green|blue|yellow|purple|white) )?(circle|square|triangle)"
_ATTR = re.compile(rf"^(?:the )?{_NP}$")
_LOC_PREFIX = re.compile(rf"^(?:the )?(left|right|top|bottom) {_NP}$")
_LOC_SUFFIX = re.compile(rf"^(?:the )?{_NP} on (left|right|top|bottom)$")
_REL = re.compile(rf"^(?:the )?{_NP} (left of|right of|above|below|near) {_NP}$")


def _named(size, colour, shape, obj) -> bool:
    return size in (None, obj.size) and colour in (None, obj.colour) and shape == obj.shape


def referents(sentence: str, objects: list) -> list[int]:
    """An independent reading of a v2 sentence: the objects it names, with no margins (the generator
    only emits expressions that hold with a margin, so the margin-free reading must agree)."""
    def named(s, c, n):
        return [i for i, o in enumerate(objects) if _named(s, c, n, o)]

    def towards(side):
        return {"left": lambda o: o.cx, "right": lambda o: -o.cx, "top": lambda o: o.cy,
                "bottom": lambda o: -o.cy}[side]

    if m := _ATTR.match(sentence):
        return named(*m.groups())
    if (m := _LOC_PREFIX.match(sentence)) or (m := _LOC_SUFFIX.match(sentence)):
        groups = m.groups()
        side, phrase = (groups[0], groups[1:]) if m.re is _LOC_PREFIX else (groups[3], groups[:3])
        cands = named(*phrase)
        assert len(cands) >= 2, f"{sentence!r}: a location word with a single candidate"
        return [min(cands, key=lambda i: towards(side)(objects[i]))]
    if m := _REL.match(sentence):
        s1, c1, n1, rel, s2, c2, n2 = m.groups()
        anchors = named(s2, c2, n2)
        assert len(anchors) == 1, f"anchor of {sentence!r} is not unique"
        a = objects[anchors[0]]
        cands = [i for i in named(s1, c1, n1) if i != anchors[0]]
        if rel == "near":
            return [min(cands, key=lambda i: math.dist((objects[i].cx, objects[i].cy), (a.cx, a.cy)))]
        holds = {"left of": lambda o: o.cx < a.cx, "right of": lambda o: o.cx > a.cx,
                 "above": lambda o: o.cy < a.cy, "below": lambda o: o.cy > a.cy}[rel]
        return [i for i in cands if holds(objects[i])]
    raise AssertionError(f"unparseable sentence {sentence!r}")


def test_every_expression_names_exactly_its_target_and_the_mask_is_its_visible_pixels() -> None:
    kinds = set()
    for split, n in (("train", 250), ("compositional", 80)):
        for s in (world_v2.generate_sample(split, i) for i in range(n)):
            assert referents(s.sentence, s.objects) == [s.target_index], s.sentence
            assert world_v2.resolve(s.expression, s.objects) == [s.target_index]
            target = s.objects[s.target_index]
            assert ((target.colour, target.shape) in synthetic.HELD_OUT_COMBOS) == (split == "compositional")
            assert s.image.shape == (96, 96, 3) and s.mask.shape == (96, 96) and len(s.objects) >= 3
            assert (s.image[s.mask] == np.array(target.rgb, dtype=np.uint8)).all()
            kinds.add(s.expression.kind)
    assert kinds == {"attribute", "location", "relation"}


def test_referents_are_large_share_their_category_and_expressions_are_short() -> None:
    samples = [world_v2.generate_sample("val", i) for i in range(300)]
    areas = np.array([s.mask.mean() for s in samples])
    same = np.mean([sum(o.shape == s.objects[s.target_index].shape for o in s.objects) >= 2 for s in samples])
    words = np.mean([len(s.sentence.split()) for s in samples])
    assert np.median(areas) >= 0.10 and areas.min() >= 0.08 * world_v2.MIN_VISIBLE
    assert same >= 0.8  # RefCOCO picks the referent among objects of its category
    assert 2.8 <= words <= 4.0  # RefCOCO: 3.6 words per expression
    grid = world_v2.IMAGE_SIZE // 8  # the demo CLIP's patch size
    assert grid >= 12


def test_samples_are_deterministic_in_split_index_and_seed() -> None:
    a, b = world_v2.generate_sample("train", 5), world_v2.WorldV2Dataset("train", num_samples=6)[5]
    assert (a.sentence == b["sentence"] and np.array_equal(a.image, b["image"])
            and np.array_equal(a.mask, b["mask"]))
    other_seed = world_v2.generate_sample("train", 5, seed=1)
    other_split = world_v2.generate_sample("test", 5)
    assert not np.array_equal(a.image, other_seed.image) and not np.array_equal(a.image, other_split.image)
    with pytest.raises(ValueError, match="split must be one of"):
        world_v2.WorldV2Dataset("training")
    with pytest.raises(IndexError):
        world_v2.WorldV2Dataset("val", num_samples=3)[3]


def test_word_roles_mark_the_target_noun_and_the_relations_anchor() -> None:
    names = roles.ROLE_NAMES
    assert [names[r] for r in roles.word_roles("left blue circle")] == ["relation", "target_attribute",
                                                                        "target_noun"]
    assert [names[r] for r in roles.word_roles("circle on top")] == ["target_noun", "relation", "relation"]
    assert [names[r] for r in roles.word_roles("the square near red circle")] == [
        "function", "target_noun", "relation", "anchor", "anchor"]
    assert [names[r] for r in roles.word_roles("large circle left of square")] == [
        "target_attribute", "target_noun", "relation", "relation", "anchor"]


def test_dense_targets_put_the_sentence_on_its_subjects_and_each_word_on_its_object() -> None:
    from examples.cris_clip import pretrain_dense as dense

    grid, context = 12, 17
    for i in range(40):
        s = dense.caption_sample("train", i)
        sentence, words = dense.dense_targets(s, grid, context)
        assert sentence.shape == (grid * grid,) and words.shape == (context, grid * grid)
        assert 0.0 <= float(sentence.min()) and float(sentence.max()) <= 1.0 and float(sentence.sum()) > 0
        text = s.caption.text.split()
        for m in s.caption.mentions:  # a word's row is the coverage of the object it names, nothing else
            assert text[m.word] == getattr(s.objects[m.obj], m.role)
            assert torch.allclose(words[1 + m.word].sum(), torch.tensor(float((s.labels == m.obj).sum()))
                                  / (96 * 96) * grid * grid, rtol=0.05)
        named = {1 + m.word for m in s.caption.mentions}
        assert all(float(words[k].abs().sum()) == 0 for k in range(context) if k not in named)

    torch.manual_seed(0)
    patches, tokens = torch.randn(2, 9, 4), torch.randn(2, 5, 4)
    image = dense.Encoded(tokens=patches, global_feature=patches.mean(1))
    text = dense.Encoded(tokens=tokens, global_feature=tokens[:, -1])
    target = torch.zeros(2, 9)
    target[:, 3] = 1.0
    got = dense.dense_losses(image, text, target, torch.zeros(2, 5, 9), torch.tensor(10.0))
    dot = torch.einsum("bnd,bd->bn", patches, tokens[:, -1])
    cos = 10.0 * torch.einsum("bnd,bd->bn", torch.nn.functional.normalize(patches, dim=-1),
                              torch.nn.functional.normalize(tokens[:, -1], dim=-1))
    expected = (-dot.log_softmax(-1)[:, 3].mean() - cos.log_softmax(-1)[:, 3].mean()) / 2
    torch.testing.assert_close(got["dense_sentence"], expected)
    assert float(got["dense_word"]) == 0.0  # no word names an object: the word term has no rows

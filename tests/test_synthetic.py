"""Tests for the synthetic referring dataset (examples/cris_clip/synthetic.py)."""

from __future__ import annotations

import itertools
import math
import re
import time

import numpy as np
import pytest
import synthetic

_NP = r"(?:(small|large) )?(?:(red|green|blue|yellow|purple|white) )?(circle|square|triangle|shape)"
_ATTR = re.compile(rf"^the {_NP}$")
_REL = re.compile(rf"^the {_NP} (left of|right of|above|below|nearest to|farthest from) the {_NP}$")
_ORD = re.compile(rf"^the (first|second|third) {_NP} from the (left|right|top|bottom)$")
_SUP = re.compile(rf"^the (leftmost|rightmost|topmost|bottommost) {_NP}$")


def _np_match(size: str | None, colour: str | None, shape: str, obj) -> bool:
    return (
        (size is None or obj.size == size)
        and (colour is None or obj.colour == colour)
        and (shape == "shape" or obj.shape == shape)
    )


def referents(sentence: str, objects: list) -> list[int]:
    """Independent interpreter: parse the sentence text and return matching object indices."""
    if m := _ATTR.match(sentence):
        return [i for i, o in enumerate(objects) if _np_match(*m.groups(), o)]
    if m := _REL.match(sentence):
        s1, c1, n1, rel, s2, c2, n2 = m.groups()
        anchors = [i for i, o in enumerate(objects) if _np_match(s2, c2, n2, o)]
        assert len(anchors) == 1, f"anchor of {sentence!r} is not unique"
        a = objects[anchors[0]]
        cands = [i for i, o in enumerate(objects) if i != anchors[0] and _np_match(s1, c1, n1, o)]
        if rel in ("nearest to", "farthest from"):
            d = {i: math.dist((objects[i].cx, objects[i].cy), (a.cx, a.cy)) for i in cands}
            best = (min if rel == "nearest to" else max)(d.values())
            return [i for i in cands if d[i] == best]
        test = {
            "left of": lambda o: o.cx < a.cx,
            "right of": lambda o: o.cx > a.cx,
            "above": lambda o: o.cy < a.cy,
            "below": lambda o: o.cy > a.cy,
        }[rel]
        return [i for i in cands if test(objects[i])]
    if (m := _ORD.match(sentence)) or (m := _SUP.match(sentence)):
        if m.re is _ORD:
            word, s, c, n, side = m.groups()
            k = ("first", "second", "third").index(word)
        else:
            word, s, c, n = m.groups()
            side, k = word[: -len("most")], 0
        cands = [i for i, o in enumerate(objects) if _np_match(s, c, n, o)]
        key = {
            "left": lambda o: o.cx,
            "right": lambda o: -o.cx,
            "top": lambda o: o.cy,
            "bottom": lambda o: -o.cy,
        }[side]
        ranked = sorted(cands, key=lambda i: key(objects[i]))
        return [ranked[k]] if len(ranked) > k else []
    raise AssertionError(f"unparseable sentence {sentence!r}")


@pytest.fixture(scope="module")
def train_samples() -> list:
    return synthetic.generate_split("train", num_samples=600, seed=0)


def test_determinism() -> None:
    a = synthetic.generate_split("val", num_samples=30, seed=3)
    b = synthetic.generate_split("val", num_samples=30, seed=3)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
        assert x.sentence == y.sentence and x.target_index == y.target_index
    c = synthetic.generate_split("val", num_samples=30, seed=4)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c, strict=True))
    assert [x.sentence for x in a] != [x.sentence for x in c]
    # splits use different seed streams
    t = synthetic.generate_split("test", num_samples=30, seed=3)
    assert all(not np.array_equal(x.image, y.image) for x, y in zip(a, t, strict=True))
    # sample i does not depend on how many are generated
    assert synthetic.generate_sample("val", 7, seed=3).sentence == a[7].sentence


def test_every_expression_is_unique(train_samples: list) -> None:
    kinds = set()
    for s in train_samples:
        assert referents(s.sentence, s.objects) == [s.target_index], s.sentence
        assert synthetic.resolve(s.expression, s.objects) == [s.target_index]
        assert s.expression.text() == s.sentence
        assert 1 <= len(s.sentence.split()) <= 12
        kinds.add(s.expression.kind)
    assert kinds == {"attribute", "relation", "ordinal"}


def test_scene_structure_and_masks(train_samples: list) -> None:
    for s in train_samples[:200]:
        assert 3 <= len(s.objects) <= 6
        assert s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3)
        assert s.mask.dtype == bool and s.mask.shape == (64, 64) and s.mask.any()
        for o1, o2 in itertools.combinations(s.objects, 2):  # no overlap
            assert math.dist((o1.cx, o1.cy), (o2.cx, o2.cy)) > o1.radius + o2.radius
        t = s.objects[s.target_index]
        yy, xx = np.mgrid[0:64, 0:64]
        in_circle = np.hypot((xx + 0.5) / 64 - t.cx, (yy + 0.5) / 64 - t.cy) <= t.radius + 1e-9
        has_colour = (s.image == np.array(t.rgb, dtype=np.uint8)).all(-1)
        assert not (s.mask & ~in_circle).any()
        assert np.array_equal(s.mask, in_circle & has_colour)  # mask == target's pixels


def test_distractors_share_attributes(train_samples: list) -> None:
    shared = 0
    for s in train_samples:
        t = s.objects[s.target_index]
        shared += any(
            o.colour == t.colour or o.shape == t.shape for i, o in enumerate(s.objects) if i != s.target_index
        )
    assert shared / len(train_samples) > 0.9


def test_compositional_split(train_samples: list) -> None:
    held = synthetic.HELD_OUT_COMBOS
    assert 3 <= len(held) <= 6
    for s in train_samples:
        t = s.objects[s.target_index]
        assert (t.colour, t.shape) not in held
    comp = synthetic.generate_split("compositional", num_samples=200)
    seen = set()
    for s in comp:
        t = s.objects[s.target_index]
        assert (t.colour, t.shape) in held
        assert referents(s.sentence, s.objects) == [s.target_index]
        seen.add((t.colour, t.shape))
    assert seen == set(held)


def test_token_length_fits_context(train_samples: list) -> None:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-16")
    assert max(len(tok.encode(s.sentence)) for s in train_samples) <= 15  # + SOT/EOT = 17


def test_larger_image_sizes() -> None:
    for size in (224, 480):
        s = synthetic.generate_sample("test", 5, image_size=size)
        small = synthetic.generate_sample("test", 5)
        assert s.image.shape == (size, size, 3) and s.mask.shape == (size, size)
        assert s.sentence == small.sentence  # geometry is resolution independent
        frac = s.mask.mean() / small.mask.mean()
        assert 0.8 < frac < 1.25


def test_dataset_class() -> None:
    ds = synthetic.SyntheticReferDataset("val", num_samples=5, seed=1)
    assert len(ds) == 5
    item = ds[2]
    assert set(item) == {"image", "mask", "sentence", "id"}
    assert item["sentence"] == synthetic.generate_sample("val", 2, seed=1).sentence
    assert len(synthetic.SyntheticReferDataset("train")) == synthetic.DEFAULT_SIZES["train"]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="split"):
        synthetic.SyntheticReferDataset("bogus")
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate_split("train", num_samples=1, image_size=8)
    with pytest.raises(ValueError, match="num_samples"):
        synthetic.generate_split("train", num_samples=-1)


def test_generation_speed() -> None:
    t0 = time.perf_counter()
    out = synthetic.generate_split("train", num_samples=2000, seed=11)
    assert len(out) == 2000
    assert time.perf_counter() - t0 < 10.0

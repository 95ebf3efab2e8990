"""The tricky parts of the reference example: the letterbox inverse, refer mask decoding, the
synthetic expressions' uniqueness, and the CRIS head's masking and batch independence."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from examples.cris_clip import cris_head, data, model, roles, synthetic  # noqa: E402


# ------------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("hw", [(480, 640), (640, 427), (200, 520)])
@pytest.mark.parametrize("logit_size", [None, 52])
def test_unletterbox_inverts_letterbox(hw: tuple[int, int], logit_size: int | None) -> None:
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.55 * w) / (0.25 * w)) ** 2 <= 1.0
    x, info = data.letterbox(np.zeros((h, w, 3), dtype=np.uint8), 224)
    assert x.shape == (3, 224, 224)
    m = data.letterbox_mask(mask, info)[None, None].float()
    if logit_size is not None:  # the model predicts at a lower resolution
        m = F.interpolate(m, size=(logit_size, logit_size), mode="bilinear", align_corners=False)
    back = data.unletterbox(m, info)[0, 0].numpy() > 0.5
    assert back.shape == (h, w)
    assert (back & mask).sum() / (back | mask).sum() > (0.98 if logit_size is None else 0.93)


def test_letterbox_pads_with_zero_after_normalisation() -> None:
    x, info = data.letterbox(np.full((50, 100, 3), 255, dtype=np.uint8), 64)
    assert (info.new_h, info.new_w, info.top, info.left) == (32, 64, 16, 0)
    assert torch.all(x[:, :16] == 0) and torch.all(x[:, 48:] == 0)
    white = (1.0 - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    torch.testing.assert_close(x[:, 30, 5], white)


# ------------------------------------------------------------------------------- refer
def test_refer_masks_decode_polygons_and_rle(tmp_path: Path) -> None:
    refer = pytest.importorskip("examples.cris_clip.refer")
    from pycocotools import mask as mask_utils

    images = tmp_path / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(images / "COCO_train2014_1.jpg")
    box = [5, 10, 25, 10, 25, 30, 5, 30]  # x0=5, y0=10, x1=25, y1=30
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "COCO_train2014_1.jpg", "height": 40, "width": 60}],
        "annotations": [{"id": 10, "image_id": 1, "segmentation": [box, box]}],  # overlap sums to 2
    }))
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val",
             "sentences": [{"sent": "left box", "sent_id": 100}, {"sent": "the box", "sent_id": 101}]}]
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))

    ds = refer.ReferDataset(tmp_path, dataset="refcoco", split="val")
    expected = np.zeros((40, 60), dtype=bool)
    expected[10:30, 5:25] = True
    assert [ds[i]["sentence"] for i in range(len(ds))] == ["left box", "the box"]
    assert ds[1]["id"] == "refcoco/val/101" and ds[0]["image"].shape == (40, 60, 3)
    np.testing.assert_array_equal(ds[0]["mask"], expected)  # bool, not the summed 0/1/2

    rle = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))
    as_json = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(refer.decode_segmentation(as_json, 40, 60), expected)


# ---------------------------------------------------------------------------- synthetic
_NP = r"(?:(small|large) )?(?:(red|green|blue|yellow|purple|white) )?(circle|square|triangle|shape)"
_ATTR = re.compile(rf"^the {_NP}$")
_REL = re.compile(rf"^the {_NP} (left of|right of|above|below|nearest to|farthest from) the {_NP}$")
_ORD = re.compile(rf"^the (first|second|third) {_NP} from the (left|right|top|bottom)$")
_SUP = re.compile(rf"^the (leftmost|rightmost|topmost|bottommost) {_NP}$")


def _named(size: str | None, colour: str | None, shape: str, obj) -> bool:
    return size in (None, obj.size) and colour in (None, obj.colour) and shape in ("shape", obj.shape)


def referents(sentence: str, objects: list) -> list[int]:
    """An independent reading of the sentence text: the indices of the objects it names."""
    if m := _ATTR.match(sentence):
        return [i for i, o in enumerate(objects) if _named(*m.groups(), o)]
    if m := _REL.match(sentence):
        s1, c1, n1, rel, s2, c2, n2 = m.groups()
        anchors = [i for i, o in enumerate(objects) if _named(s2, c2, n2, o)]
        assert len(anchors) == 1, f"anchor of {sentence!r} is not unique"
        a = objects[anchors[0]]
        cands = [i for i, o in enumerate(objects) if i != anchors[0] and _named(s1, c1, n1, o)]
        if rel in ("nearest to", "farthest from"):
            d = {i: math.dist((objects[i].cx, objects[i].cy), (a.cx, a.cy)) for i in cands}
            best = (min if rel == "nearest to" else max)(d.values())
            return [i for i in cands if d[i] == best]
        holds = {"left of": lambda o: o.cx < a.cx, "right of": lambda o: o.cx > a.cx,
                 "above": lambda o: o.cy < a.cy, "below": lambda o: o.cy > a.cy}[rel]
        return [i for i in cands if holds(objects[i])]
    if m := _ORD.match(sentence):
        word, s, c, n, side = m.groups()
        k = ("first", "second", "third").index(word)
    elif m := _SUP.match(sentence):
        word, s, c, n = m.groups()
        side, k = word[: -len("most")], 0
    else:
        raise AssertionError(f"unparseable sentence {sentence!r}")
    key = {"left": lambda o: o.cx, "right": lambda o: -o.cx, "top": lambda o: o.cy,
           "bottom": lambda o: -o.cy}[side]
    ranked = sorted((i for i, o in enumerate(objects) if _named(s, c, n, o)), key=lambda i: key(objects[i]))
    return [ranked[k]] if len(ranked) > k else []


def test_every_synthetic_expression_names_exactly_its_target() -> None:
    kinds = set()
    for split, n in (("train", 300), ("compositional", 100)):
        for s in (synthetic.generate_sample(split, i) for i in range(n)):
            assert referents(s.sentence, s.objects) == [s.target_index], s.sentence
            target = s.objects[s.target_index]
            assert ((target.colour, target.shape) in synthetic.HELD_OUT_COMBOS) == (split == "compositional")
            has_colour = (s.image == np.array(target.rgb, dtype=np.uint8)).all(-1)
            assert s.mask.any() and np.array_equal(s.mask, has_colour)  # the mask is the target's pixels
            kinds.add(s.expression.kind)
    assert kinds == {"attribute", "relation", "ordinal"}
    # sample i depends only on (split, i, seed), not on how many are drawn
    assert (synthetic.generate_sample("train", 7).sentence
            == synthetic.SyntheticReferDataset("train", num_samples=8)[7]["sentence"])


# ---------------------------------------------------------------------------- CRIS head
def _head_and_inputs(b: int = 3, length: int = 9):
    torch.manual_seed(0)
    head = model.CRISHead(vis_dim=24, text_dim=20, num_levels=3, dim=32, nhead=4, dim_feedforward=64,
                          proj_dim=16, num_layers=2, word_dim=12)
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(b, 24, 8, 8, generator=g) for _ in range(3)]
    sentence, words = torch.randn(b, 20, generator=g), torch.randn(b, length, 12, generator=g)
    pad = torch.arange(length)[None, :] >= torch.tensor([length - 2 - i for i in range(b)])[:, None]
    return head, levels, sentence, words, pad


def test_word_roles_follow_the_expression_structure() -> None:
    """Each word's role, derived from the sentence text, agrees with the structured expression."""
    names = roles.ROLE_NAMES
    for index in range(300):
        sample = synthetic.generate_sample("train", index)
        expr, words = sample.expression, sample.sentence.split()
        got = [names[r] for r in roles.word_roles(sample.sentence)]
        assert len(got) == len(words) and got.count("target_noun") == 1
        target_words = [w for w in (expr.target.size, expr.target.colour) if w]
        assert sorted(w for w, r in zip(words, got) if r == "target_attribute") == sorted(target_words)
        anchor = [] if expr.anchor is None else expr.anchor.text().split()
        assert [w for w, r in zip(words, got) if r == "anchor"] == anchor
        assert all(r == "function" for w, r in zip(words, got) if w == "the")


def test_token_roles_cover_exactly_the_word_tokens() -> None:
    tokenizer = data.open_clip.get_tokenizer("ViT-B-16", context_length=17)
    for index in range(100):
        sentence = synthetic.generate_sample("val", index).sentence
        ids = tokenizer([sentence])[0]
        by_token = roles.token_roles(sentence, tokenizer, 17)
        is_word = (ids != 0) & (ids != ids[0]) & (ids != ids[ids.nonzero().max()])  # not SOT, EOT, padding
        assert torch.equal(by_token >= 0, is_word)
    with pytest.raises(ValueError, match="'banana'"):
        roles.word_roles("the banana")


def test_cris_head_ignores_padded_words() -> None:
    head, levels, sentence, words, pad = _head_and_inputs()
    noisy = words.clone()
    noisy[pad] = 100.0 * torch.randn(int(pad.sum()), 12)
    head.eval()
    with torch.no_grad():
        out = head(levels, sentence, words, pad)
        assert out.shape == (3, 1, 32, 32)
        torch.testing.assert_close(head(levels, sentence, noisy, pad), out, rtol=0, atol=1e-6)
        assert not torch.allclose(head(levels, sentence, noisy, torch.zeros_like(pad)), out)


def test_cris_head_eval_output_does_not_depend_on_the_batch() -> None:
    head, levels, sentence, words, pad = _head_and_inputs()
    head.eval()
    with torch.no_grad():
        batch = head(levels, sentence, words, pad)
        alone = head([lv[1:2] for lv in levels], sentence[1:2], words[1:2], pad[1:2])
    torch.testing.assert_close(alone, batch[1:2], rtol=1e-5, atol=1e-5)


def test_cris_head_trains_on_a_batch_of_one() -> None:  # CRIS's BatchNorm1d text projection would fail
    head, levels, sentence, words, pad = _head_and_inputs(b=1)
    head.train()
    head(levels, sentence, words, pad).sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_dynamic_conv_is_a_per_sample_convolution() -> None:
    g = torch.Generator().manual_seed(3)
    x, weight, bias = (torch.randn(4, 6, 9, 11, generator=g), torch.randn(4, 6, 3, 3, generator=g),
                       torch.randn(4, generator=g))
    loop = torch.cat([F.conv2d(x[i : i + 1], weight[i : i + 1], bias[i : i + 1], padding=1)
                      for i in range(4)])
    torch.testing.assert_close(cris_head.dynamic_conv(x, weight, bias), loop, rtol=1e-5, atol=1e-5)



def test_resume_check_treats_settings_added_since_the_checkpoint_as_defaults() -> None:
    import subprocess
    import sys

    probe = """
import json
from pathlib import Path
import config
now = config.PRESETS["demo"].to_dict()
older = json.loads(json.dumps(now))  # a checkpoint written before these settings existed
del older["data"]["world"], older["model"]["dense_scoring"], older["distill"]["lmvsd"]["surgery"]
out = [config.trajectory_changes(older, now)]
older["optim"]["lr"] = 1.0
out.append(config.trajectory_changes(older, now))
changed = json.loads(json.dumps(now))
changed["data"]["world"] = "v2"
out.append(config.trajectory_changes(changed, now))
relative, absolute = dict(now, model=dict(now["model"])), dict(now, model=dict(now["model"]))
relative["model"]["pretrained"] = "config.py"
absolute["model"]["pretrained"] = str(Path("config.py").resolve())
out.append(config.trajectory_changes(relative, absolute))  # one file, two spellings
absolute["model"]["pretrained"] = str(Path("model.py").resolve())
out.append(config.trajectory_changes(relative, absolute))
print(json.dumps(out))
"""
    example = Path(__file__).resolve().parents[1] / "examples" / "cris_clip"
    done = subprocess.run([sys.executable, "-c", probe], cwd=example, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    same, lr, world, same_file, other_file = json.loads(done.stdout)
    assert same == {} and list(lr) == ["optim.lr"] and lr["optim.lr"][0] == 1.0
    assert world == {"data.world": ["v2", "v1"]}
    assert same_file == {} and list(other_file) == ["model.pretrained"]

"""Tests for the refer-format loader on a tiny dataset written into tmp_path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import refer
from PIL import Image

# (image_id, file_name, height, width)
IMAGES = [(1, "COCO_train2014_000000000001.jpg", 40, 60), (2, "COCO_train2014_000000000002.jpg", 50, 30)]
# ann_id -> (image_id, x0, y0, x1, y1) rectangle in pixel-corner coordinates
RECTS = {10: (1, 5, 10, 25, 30), 11: (1, 30, 0, 60, 20), 20: (2, 0, 0, 10, 50)}


def _expected(ann_id: int) -> np.ndarray:
    image_id, x0, y0, x1, y1 = RECTS[ann_id]
    h, w = next((h, w) for i, _, h, w in IMAGES if i == image_id)
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture()
def refer_root(tmp_path: Path) -> Path:
    img_dir = tmp_path / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    for i, (_, name, h, w) in enumerate(IMAGES):
        arr = np.full((h, w, 3), 40 * (i + 1), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / name)
    annotations = []
    for ann_id, (image_id, x0, y0, x1, y1) in RECTS.items():
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
        seg = [poly] if ann_id != 11 else [poly, poly]  # duplicated polygon: overlap sums to 2
        annotations.append(
            {"id": ann_id, "image_id": image_id, "segmentation": seg, "category_id": 1, "iscrowd": 0}
        )
    instances = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in IMAGES],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    ds_dir = tmp_path / "refcoco"
    ds_dir.mkdir()
    (ds_dir / "instances.json").write_text(json.dumps(instances))

    def sents(*texts: str, start: int) -> list[dict]:
        return [
            {"sent": t, "raw": t.upper(), "sent_id": start + k, "tokens": t.split()}
            for k, t in enumerate(texts)
        ]

    refs = [
        {
            "ref_id": 0,
            "ann_id": 10,
            "image_id": 1,
            "split": "val",
            "category_id": 1,
            "sentences": sents("left box", "the box on the left", start=100),
        },
        {
            "ref_id": 1,
            "ann_id": 11,
            "image_id": 1,
            "split": "val",
            "category_id": 1,
            "sentences": sents("top right box", start=200),
        },
        {
            "ref_id": 2,
            "ann_id": 20,
            "image_id": 2,
            "split": "testA",
            "category_id": 1,
            "sentences": sents("thin strip", "left strip", "strip", start=300),
        },
    ]
    with open(ds_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return tmp_path


def test_loads_sentences_and_masks(refer_root: Path) -> None:
    ds = refer.ReferDataset(refer_root, dataset="refcoco", split="val")
    assert ds.split_by == "unc" and len(ds) == 3
    items = [ds[i] for i in range(len(ds))]
    assert [it["sentence"] for it in items] == ["left box", "the box on the left", "top right box"]
    assert [it["ref_id"] for it in items] == [0, 0, 1]
    assert [it["id"] for it in items] == ["refcoco/val/100", "refcoco/val/101", "refcoco/val/200"]
    for it, ann_id in zip(items, (10, 10, 11), strict=True):
        assert it["image"].dtype == np.uint8 and it["image"].shape == (40, 60, 3)
        assert it["mask"].dtype == bool
        np.testing.assert_array_equal(it["mask"], _expected(ann_id))
        assert it["image_id"] == 1

    ds_a = refer.ReferDataset(refer_root, split="testA")
    assert len(ds_a) == 3
    it = ds_a[1]
    assert it["image"].shape == (50, 30, 3) and it["sentence"] == "left strip"
    np.testing.assert_array_equal(it["mask"], _expected(20))
    assert len(refer.ReferDataset(refer_root, split="testB")) == 0


def test_rle_segmentation() -> None:
    from pycocotools import mask as mask_utils

    m = np.zeros((6, 7), dtype=bool)
    m[1:4, 2:6] = True
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle_str = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(refer.decode_segmentation(rle_str, 6, 7), m)
    np.testing.assert_array_equal(refer.decode_segmentation([], 6, 7), np.zeros((6, 7), bool))


def test_missing_files(refer_root: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        refer.ReferDataset(refer_root, dataset="refcoco+", split="val")
    msg = str(e.value)
    assert str(refer_root / "refcoco+" / "refs(unc).p") in msg and "refcoco+.zip" in msg

    (refer_root / "refcoco" / "instances.json").rename(refer_root / "moved.json")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        refer.ReferDataset(refer_root, split="val")
    (refer_root / "moved.json").rename(refer_root / "refcoco" / "instances.json")

    with pytest.raises(FileNotFoundError) as e:
        refer.ReferDataset(refer_root, split="val", image_root=refer_root / "nope")
    assert str(refer_root / "nope") in str(e.value) and "train2014" in str(e.value)

    img = refer_root / "images" / "mscoco" / "images" / "train2014" / IMAGES[0][1]
    img.unlink()
    ds = refer.ReferDataset(refer_root, split="val")
    with pytest.raises(FileNotFoundError) as e:
        ds[0]
    assert str(img) in str(e.value)


def test_argument_validation(refer_root: Path) -> None:
    with pytest.raises(ValueError, match="dataset"):
        refer.ReferDataset(refer_root, dataset="refclef")
    with pytest.raises(ValueError, match="split"):
        refer.ReferDataset(refer_root, dataset="refcoco", split="test")
    with pytest.raises(ValueError, match="split_by"):
        refer.ReferDataset(refer_root, dataset="refcoco", split_by="umd")
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        refer.ReferDataset(refer_root, dataset="refcocog", split="test")

"""RefCOCO / RefCOCO+ / G-Ref loader for the "refer" data format (no downloads).

Expected layout (as produced by unzipping the refer data, see
https://github.com/lichengunc/refer and the LAVT README)::

    <data_root>/<dataset>/refs(<split_by>).p   # pickle: list of refs
    <data_root>/<dataset>/instances.json       # COCO-style images + annotations
    <image_root>/COCO_train2014_*.jpg          # COCO train2014 images

A ref is ``{ref_id, ann_id, image_id, split, sentences: [{sent, sent_id, ...}], ...}``.
There is one item per *sentence*. The mask is the ref's annotation: polygons are rasterised
with ``pycocotools.mask.frPyObjects(polys, h, w)``, decoded, OR-ed over polygons and binarised
with ``> 0`` (overlapping polygons would otherwise sum to 2).

The ``.p`` files are pickles: only load files from a source you trust.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

DEFAULT_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
VALID_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
REFER_DATA_HELP = (
    "Get the refer annotations ({dataset}.zip: refs(*).p + instances.json) as described in "
    "https://github.com/lichengunc/refer (data/README; e.g. "
    "https://bvisionweb1.cs.unc.edu/licheng/referit/data/{dataset}.zip) and in the LAVT "
    "README, and unzip it so that this file exists. Nothing is downloaded automatically."
)
COCO_IMAGES_HELP = (
    "Get the COCO train2014 images (http://images.cocodataset.org/zips/train2014.zip, "
    "https://cocodataset.org) and unzip them there, or pass image_root=<folder with "
    "COCO_train2014_*.jpg>. Nothing is downloaded automatically."
)


def default_image_roots(data_root: Path) -> list[Path]:
    """Folders searched for COCO train2014 images when ``image_root`` is not given."""
    return [
        data_root / "images" / "mscoco" / "images" / "train2014",  # refer repo layout
        data_root / "images" / "train2014",
        data_root / "train2014",
        data_root / "coco" / "train2014",
    ]


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:  # python-2 pickle with non-ascii str
            f.seek(0)
            return pickle.load(f, encoding="latin1")


def _decode(rle: Any) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools vs numpy 2 `copy=` DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO segmentation (polygon list, uncompressed or compressed RLE).

    Returns:
        bool ``[height, width]``.
    """
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(segmentation, height, width)
        m = _decode(rles)  # [H, W, N]
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        m = _decode(rle)
    else:
        raise ValueError(f"unsupported segmentation format: {type(segmentation).__name__}")
    if m.ndim == 3:
        m = m.sum(axis=2)
    return m > 0


class ReferDataset(Dataset):
    """One item per referring sentence of a refer-format dataset split.

    Args:
        data_root: folder containing ``<dataset>/refs(<split_by>).p`` and
            ``<dataset>/instances.json``.
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        split_by: ``"unc"`` (refcoco/refcoco+, default) or ``"umd"`` (refcocog, default) /
            ``"google"`` (refcocog).
        split: ``train/val/testA/testB`` (unc) or ``train/val/test`` (umd).
        image_root: folder of COCO train2014 images (default: searched under ``data_root``,
            see :func:`default_image_roots`).

    Items are dicts: ``image`` uint8 ``[H, W, 3]``, ``mask`` bool ``[H, W]``, ``sentence``
    str, ``ref_id`` int, ``image_id`` int, ``id`` str ``"<dataset>/<split>/<sent_id>"``.

    Raises:
        FileNotFoundError: naming the missing file/folder, where it was looked for and where
            to get it.
    """

    def __init__(
        self,
        data_root: str | Path,
        *,
        dataset: str = "refcoco",
        split_by: str | None = None,
        split: str = "val",
        image_root: str | Path | None = None,
    ) -> None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise ValueError(f"dataset must be one of {sorted(DEFAULT_SPLIT_BY)}, got {dataset!r}")
        split_by = DEFAULT_SPLIT_BY[dataset] if split_by is None else split_by
        if (dataset, split_by) not in VALID_SPLITS:
            valid = sorted(s for d, s in VALID_SPLITS if d == dataset)
            raise ValueError(f"split_by for {dataset} must be one of {valid}, got {split_by!r}")
        if split not in VALID_SPLITS[(dataset, split_by)]:
            raise ValueError(
                f"split for {dataset}({split_by}) must be one of "
                f"{list(VALID_SPLITS[(dataset, split_by)])}, got {split!r}"
            )
        self.data_root = Path(data_root)
        self.dataset, self.split_by, self.split = dataset, split_by, split

        ds_dir = self.data_root / dataset
        refs_path = ds_dir / f"refs({split_by}).p"
        inst_path = ds_dir / "instances.json"
        for path in (refs_path, inst_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{dataset} annotation file not found: {path} (looked for "
                    f"'{path.name}' in {ds_dir}). " + REFER_DATA_HELP.format(dataset=dataset)
                )
        self.image_root = self._find_image_root(image_root)

        refs = _load_pickle(refs_path)
        with open(inst_path) as f:
            instances = json.load(f)
        self.images: dict[int, dict] = {im["id"]: im for im in instances["images"]}
        self.annotations: dict[int, dict] = {a["id"]: a for a in instances["annotations"]}

        self.items: list[tuple[dict, int, dict]] = []  # (ref, sentence index, sentence)
        for ref in refs:
            if ref["split"] != split:
                continue
            if ref["ann_id"] not in self.annotations:
                raise ValueError(f"ref {ref['ref_id']}: ann_id {ref['ann_id']} not in {inst_path}")
            if ref["image_id"] not in self.images:
                raise ValueError(f"ref {ref['ref_id']}: image_id {ref['image_id']} not in {inst_path}")
            for k, sent in enumerate(ref["sentences"]):
                self.items.append((ref, k, sent))

    def _find_image_root(self, image_root: str | Path | None) -> Path:
        if image_root is not None:
            root = Path(image_root)
            if not root.is_dir():
                raise FileNotFoundError(
                    f"COCO train2014 image folder not found: {root} (image_root). " + COCO_IMAGES_HELP
                )
            return root
        candidates = default_image_roots(self.data_root)
        for root in candidates:
            if root.is_dir():
                return root
        raise FileNotFoundError(
            "COCO train2014 image folder not found; looked for "
            + ", ".join(str(c) for c in candidates)
            + ". "
            + COCO_IMAGES_HELP
        )

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, image_id: int) -> np.ndarray:
        """uint8 ``[H, W, 3]`` RGB image."""
        meta = self.images[image_id]
        path = self.image_root / meta["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"image {meta['file_name']} (image_id {image_id}) not found: {path} "
                f"(looked in {self.image_root}). " + COCO_IMAGES_HELP
            )
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()

    def load_mask(self, ann_id: int) -> np.ndarray:
        """bool ``[H, W]`` mask of annotation ``ann_id``."""
        ann = self.annotations[ann_id]
        meta = self.images[ann["image_id"]]
        return decode_segmentation(ann["segmentation"], int(meta["height"]), int(meta["width"]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sentences")
        ref, k, sent = self.items[index]
        image = self.load_image(ref["image_id"])
        mask = self.load_mask(ref["ann_id"])
        if mask.shape != image.shape[:2]:
            raise ValueError(f"ref {ref['ref_id']}: mask {mask.shape} does not match image {image.shape[:2]}")
        sent_id = sent.get("sent_id", f"{ref['ref_id']}_{k}")
        return {
            "image": image,
            "mask": mask,
            "sentence": sent.get("sent", sent.get("raw", "")),
            "ref_id": ref["ref_id"],
            "image_id": ref["image_id"],
            "id": f"{self.dataset}/{self.split}/{sent_id}",
        }

    def __repr__(self) -> str:
        return (
            f"ReferDataset({str(self.data_root)!r}, dataset={self.dataset!r}, "
            f"split_by={self.split_by!r}, split={self.split!r}, sentences={len(self)})"
        )

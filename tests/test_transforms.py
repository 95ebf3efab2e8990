"""Tests for examples/cris_clip/transforms.py (letterbox round trip, tokenizer, batching)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transforms
from torch.utils.data import DataLoader


def _blob(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.55 * w) / (0.25 * w)) ** 2 <= 1.0


@pytest.fixture(scope="module")
def tok() -> transforms.Tokenizer:
    return transforms.Tokenizer("ViT-B-16", context_length=17)


@pytest.mark.parametrize("hw", [(480, 640), (640, 427), (300, 300), (200, 520), (520, 180)])
@pytest.mark.parametrize("logit_size", [None, 52])
def test_letterbox_round_trip(hw: tuple[int, int], logit_size: int | None) -> None:
    h, w = hw
    mask = _blob(h, w)
    image = np.zeros((h, w, 3), dtype=np.uint8)
    x, info = transforms.letterbox(image, 224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    lb = transforms.letterbox_mask(mask, info)
    assert lb.shape == (224, 224) and set(lb.unique().tolist()) <= {0.0, 1.0}
    m = lb[None, None]
    if logit_size is not None:  # model output at a lower resolution
        m = torch.nn.functional.interpolate(
            m, size=(logit_size, logit_size), mode="bilinear", align_corners=False
        )
    back = transforms.unletterbox(m, info)
    assert back.shape == (1, 1, h, w)
    rec = back[0, 0].numpy() > 0.5
    iou = (rec & mask).sum() / (rec | mask).sum()
    assert iou > (0.98 if logit_size is None else 0.93), iou


def test_letterbox_padding_and_normalisation() -> None:
    image = np.full((50, 100, 3), 255, dtype=np.uint8)
    x, info = transforms.letterbox(image, 64)
    assert (info.new_h, info.new_w, info.top, info.left) == (32, 64, 16, 0)
    assert torch.all(x[:, :16] == 0) and torch.all(x[:, 48:] == 0)  # padding normalises to 0
    std = torch.tensor(transforms.CLIP_STD).view(3, 1)
    mean = torch.tensor(transforms.CLIP_MEAN).view(3, 1)
    expected = ((1.0 - mean) / std).expand(3, 64)
    torch.testing.assert_close(x[:, 30], expected)
    # pixels equal to the CLIP mean colour also normalise to ~0
    mean_img = np.broadcast_to(np.round(np.array(transforms.CLIP_MEAN) * 255), (8, 8, 3))
    x2, _ = transforms.letterbox(mean_img.astype(np.uint8), 8)
    assert x2.abs().max() < 0.01


def test_letterbox_validation() -> None:
    with pytest.raises(ValueError, match="image"):
        transforms.letterbox(np.zeros((4, 4), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="image"):
        transforms.letterbox(np.zeros((4, 4, 3), dtype=np.float32), 8)
    with pytest.raises(TypeError, match="image"):
        transforms.letterbox(torch.zeros(4, 4, 3), 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        transforms.letterbox(np.zeros((4, 4, 3), dtype=np.uint8), 0)
    _, info = transforms.letterbox(np.zeros((4, 6, 3), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="mask"):
        transforms.letterbox_mask(np.zeros((6, 4), dtype=bool), info)
    with pytest.raises(ValueError, match="prob"):
        transforms.unletterbox(torch.zeros(5), info)


def test_unletterbox_dtype_and_batch() -> None:
    _, info = transforms.letterbox(np.zeros((30, 40, 3), dtype=np.uint8), 32)
    out = transforms.unletterbox(torch.rand(2, 3, 8, 8, dtype=torch.float64), info)
    assert out.shape == (2, 3, 30, 40) and out.dtype == torch.float64
    const = transforms.unletterbox(torch.full((8, 8), 0.25), info)
    torch.testing.assert_close(const, torch.full((30, 40), 0.25))


def test_tokenizer_shapes_and_truncation(tok: transforms.Tokenizer) -> None:
    ids = tok(["the red circle", "the second small purple triangle from the left"])
    assert ids.shape == (2, 17) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.sot_token_id).all()
    for row in ids:
        assert (row == tok.eot_token_id).sum() == 1
        n = int((row != 0).sum())
        assert row[n - 1] == tok.eot_token_id and (row[n:] == 0).all()
    long = tok(" ".join(["banana"] * 40))
    assert long.shape == (1, 17) and long[0, 0] == tok.sot_token_id
    assert long[0, -1] == tok.eot_token_id and (long[0] != 0).all()
    assert transforms.MAX_LEN["refcocog"] == 22 and transforms.MAX_LEN["refcoco"] == 17
    with pytest.raises(ValueError, match="context_length"):
        transforms.Tokenizer(context_length=1)


def test_prepared_dataset_and_collate(tok: transforms.Tokenizer) -> None:
    import synthetic

    base = synthetic.SyntheticReferDataset("val", num_samples=4)
    ds = transforms.PreparedDataset(base, image_size=96, tokenizer=tok)
    item = ds[0]
    assert item["image"].shape == (3, 96, 96) and item["mask"].shape == (96, 96)
    assert item["text"].shape == (17,) and item["orig_mask"].shape == (64, 64)
    assert isinstance(item["info"], transforms.LetterboxInfo)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=transforms.collate)))
    assert batch["image"].shape == (4, 3, 96, 96)
    assert batch["mask"].shape == (4, 96, 96) and batch["text"].shape == (4, 17)
    assert len(batch["info"]) == 4 and len(batch["sentence"]) == 4 and len(batch["id"]) == 4
    assert batch["orig_mask"][0].dtype == bool
    # square 64px image at 96px: the letterboxed mask is the upscaled mask
    back = transforms.unletterbox(batch["mask"][0], batch["info"][0]) > 0.5
    assert (back.numpy() == batch["orig_mask"][0]).mean() > 0.99
    with pytest.raises(ValueError, match="batch"):
        transforms.collate([])

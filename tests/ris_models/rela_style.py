"""A ReLA / GRES-style model (henghuiding/ReLA, CVPR 2023), written the way its detectron2 code is
written, without detectron2 (not a test module; tiny widths).

* ``forward(batched_inputs: list[dict])``: each dict holds one sample's ``"image"`` ``[3, H, W]``
  (0–255), ``"lang_tokens"`` / ``"lang_mask"`` ``[1, L]`` (BERT ids, [CLS] … [SEP], 0-padded),
  and for training ``"gt_mask_merged"`` ``[1, H, W]`` and ``"empty"`` (no-target flag). The model
  normalises and pads the images to a multiple of ``size_divisibility`` (detectron2's
  ``ImageList.from_tensors``), runs a Hugging Face ``BertModel``, a ResNet-style backbone whose
  ``backbone.stem`` is detectron2's ``BasicStem`` (7×7/2 conv, norm, ``F.relu_``, 3×3/2 max-pool:
  ``[B, 16, H/4, W/4]``), then ``sem_seg_head`` (pixel-word attention on ``res5``, a ``res2``
  lateral): ``{"pred_masks": [B, 2, H/4, W/4], "minimap": [B, 2, H/32, W/32], "nt_label": [B, 2]}``.
* Training returns the loss dict ``{"loss_mask", "loss_minimap", "loss_nt"}`` (weighted CE on the
  two-class masks, as ReLA); eval returns one dict per image, ``{"ref_seg": [H_i, W_i]
  foreground probability, "nt_label": [2]}``, cropped to the image's own size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

CLS, SEP, PAD = 101, 102, 0
VOCAB, WIDTH = 128, 32


class BasicStem(nn.Module):
    """detectron2's ResNet stem: ``[B, 3, H, W] -> [B, 16, H/4, W/4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.norm(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.ReLU())


class Backbone(nn.Module):
    """Stem then ``res2`` … ``res5`` (strides 4, 8, 16, 32): a dict of feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = BasicStem()
        self.res2, self.res3 = _stage(16, WIDTH, 1), _stage(WIDTH, WIDTH, 2)
        self.res4, self.res5 = _stage(WIDTH, WIDTH, 2), _stage(WIDTH, WIDTH, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        x = self.stem(x)
        for name in ("res2", "res3", "res4", "res5"):
            x = out[name] = getattr(self, name)(x)
        return out


class RefHead(nn.Module):
    """Pixel-word attention on ``res5`` (queries ``pixel_query``, keys ``word_key``), a ``res2``
    lateral, two-class mask logits, a minimap and a no-target logit."""

    def __init__(self) -> None:
        super().__init__()
        self.pixel_query = nn.Conv2d(WIDTH, WIDTH, 1)
        self.word_key, self.word_value = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.lateral = nn.Conv2d(WIDTH, WIDTH, 1)
        self.predictor, self.minimap = nn.Conv2d(WIDTH, 2, 1), nn.Conv2d(WIDTH, 2, 1)
        self.nt_embed = nn.Linear(WIDTH, 2)

    def forward(self, features: dict[str, Tensor], lang: Tensor, lang_mask: Tensor) -> dict[str, Tensor]:
        res5 = features["res5"]
        b, c, h, w = res5.shape
        query = self.pixel_query(res5).flatten(2).transpose(1, 2)  # [B, h·w, C]
        scores = query @ self.word_key(lang).transpose(1, 2) / c**0.5  # [B, h·w, L]
        attn = scores.masked_fill(lang_mask[:, None] == 0, float("-inf")).softmax(-1)
        fused = res5 + (attn @ self.word_value(lang)).transpose(1, 2).reshape(b, c, h, w)
        up = F.interpolate(fused, size=features["res2"].shape[-2:], mode="bilinear", align_corners=False)
        pixel = F.relu(up + self.lateral(features["res2"]))
        return {"pred_masks": self.predictor(pixel), "minimap": self.minimap(fused),
                "nt_label": self.nt_embed(fused.mean(dim=(2, 3)))}


def pad_images(images: list[Tensor], divisibility: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """``ImageList.from_tensors``: zero-pad to the largest size, rounded up to ``divisibility``."""
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    height = -(-max(h for h, _ in sizes) // divisibility) * divisibility
    width = -(-max(w for _, w in sizes) // divisibility) * divisibility
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for i, x in enumerate(images):
        batch[i, :, : x.shape[-2], : x.shape[-1]] = x
    return batch, sizes


class ReLAStyle(nn.Module):
    """The model; ``forward(batched_inputs)`` as described in the module docstring."""

    def __init__(self, size_divisibility: int = 32) -> None:
        super().__init__()
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor([123.7, 116.3, 103.5]).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor([58.4, 57.1, 57.4]).view(-1, 1, 1), persistent=False)
        self.backbone = Backbone()
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=2 * WIDTH,
                                         max_position_embeddings=32)
        self.text_encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.sem_seg_head = RefHead()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: list[dict[str, Any]]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        images, sizes = pad_images(images, self.size_divisibility)
        ids = torch.cat([x["lang_tokens"] for x in batched_inputs]).to(self.device)
        lang_mask = torch.cat([x["lang_mask"] for x in batched_inputs]).to(self.device)
        lang = self.text_encoder(input_ids=ids, attention_mask=lang_mask)[0]
        outputs = self.sem_seg_head(self.backbone(images), lang, lang_mask)
        if self.training:
            gt, _ = pad_images([x["gt_mask_merged"].to(self.device).float() for x in batched_inputs],
                               self.size_divisibility)
            empty = torch.tensor([x["empty"] for x in batched_inputs], device=self.device, dtype=torch.long)
            return self.losses(outputs, gt[:, 0], empty)
        masks = F.interpolate(outputs["pred_masks"], size=images.shape[-2:], mode="bilinear",
                              align_corners=False)
        return [{"ref_seg": masks[i].softmax(0)[1, :h, :w], "nt_label": outputs["nt_label"][i].softmax(0)}
                for i, (h, w) in enumerate(sizes)]

    def losses(self, outputs: dict[str, Tensor], gt: Tensor, empty: Tensor) -> dict[str, Tensor]:
        weight = torch.tensor([0.9, 1.1], device=gt.device)
        masks = F.interpolate(outputs["pred_masks"], size=gt.shape[-2:], mode="bilinear", align_corners=False)
        small = F.interpolate(gt[:, None], size=outputs["minimap"].shape[-2:], mode="nearest")[:, 0]
        return {"loss_mask": F.cross_entropy(masks, gt.long(), weight=weight),
                "loss_minimap": F.cross_entropy(outputs["minimap"], small.long(), weight=weight),
                "loss_nt": 0.1 * F.cross_entropy(outputs["nt_label"], empty)}


def make_inputs(batch_size: int = 3, size: int = 64, length: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Random samples of one size (ReLA resizes training images to a fixed square), a box mask each,
    ids ``[CLS] w … [SEP] 0 …``; the last sample has no target (``empty``)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(batch_size):
        n = 1 + int(torch.randint(1, length - 2, (1,), generator=g))
        ids = torch.zeros(1, length, dtype=torch.long)
        ids[0, 0], ids[0, 1:n], ids[0, n] = CLS, torch.randint(3, CLS, (n - 1,), generator=g), SEP
        gt = torch.zeros(1, size, size)
        empty = i == batch_size - 1
        if not empty:
            top, left = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            gt[:, top : top + size // 3, left : left + size // 3] = 1
        samples.append({"image": 255 * torch.rand(3, size, size, generator=g), "lang_tokens": ids,
                        "lang_mask": (ids != PAD).long(), "gt_mask_merged": gt, "empty": empty})
    return samples

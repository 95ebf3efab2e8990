"""Small RIS models written without masksd in mind, for the hook-backend tests (not a test module).

* ``TinyRIS``: the README's one-module model. Late fusion; a conv patch embedding (stride 4)
  followed by a strided conv backbone (stride 8), so the scoring grid is coarser than the
  embedding grid (CNN-style units); ``forward(img, ids) -> logits [B, 1, h, w]``.
* ``EarlyFusionRIS``: the sentence feature enters the image backbone (LAVT-style text → image
  fusion); BatchNorm in the backbone; two-class logits ``[B, 2, H, W]``.
* ``LossReturningRIS``: CRIS-style training forward ``(img, ids, mask) -> (pred.detach(), mask,
  loss)``, eval forward ``-> pred``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import masksd

VOCAB, DIM, SIZE = 50, 16, 32
PAD = 0


class TinyRIS(nn.Module):
    """Your model, unchanged: conv backbone, text encoder, fusion by gating, conv decoder."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)  # image embedding [B, D, H/4, W/4]
        self.backbone = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(dim, dim, 3, stride=2, padding=1))  # [B, D, H/8, W/8]
        self.word_embed = nn.Embedding(vocab, dim)  # text embedding [B, L, D]
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.decoder = nn.Conv2d(dim, 1, 1)

    def forward(self, img: Tensor, ids: Tensor) -> Tensor:
        v = self.backbone(self.patch_embed(img))
        w = self.text_encoder(self.word_embed(ids), src_key_padding_mask=ids == PAD)
        keep = (ids != PAD).float()[..., None]
        s = (w * keep).sum(1) / keep.sum(1)
        return self.decoder(v * s[:, :, None, None])


def tiny_spec(**changes: object) -> masksd.HookSpec:
    """The README's spec for ``TinyRIS``."""
    spec = masksd.HookSpec(
        image=masksd.ModalitySpec(embed="patch_embed", layout="bchw",
                                  tokens=masksd.Tap("backbone", layout="bchw"), reuse=("backbone",)),
        text=masksd.ModalitySpec(embed="word_embed", maskable=masksd.Maskable(ids="ids", never=(PAD,)),
                                 tokens=masksd.Tap("text_encoder"), reuse=("text_encoder",)),
    )
    return masksd.HookSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, **changes})


class EarlyFusionRIS(nn.Module):
    """Text → image fusion inside the backbone; two-class logits at the input size."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.word_embed = nn.Embedding(vocab, dim)
        self.text_encoder = nn.GRU(dim, dim, batch_first=True)
        self.stage1 = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.fuse = nn.Linear(dim, dim)
        self.stage2 = nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim),
                                    nn.ReLU())
        self.head = nn.Conv2d(dim, 2, 1)

    def forward(self, image: Tensor, ids: Tensor) -> Tensor:
        words, _ = self.text_encoder(self.word_embed(ids))
        sentence = words.mean(1)
        x = self.stage1(self.patch_embed(image))
        x = x * torch.sigmoid(self.fuse(sentence))[:, :, None, None]  # language enters the backbone
        x = self.stage2(x)
        return F.interpolate(self.head(x), size=image.shape[-2:], mode="bilinear", align_corners=False)


def early_spec(**changes: object) -> masksd.HookSpec:
    spec = masksd.HookSpec(
        image=masksd.ModalitySpec(embed="patch_embed", layout="bchw",
                                  tokens=masksd.Tap("stage2", layout="bchw"), reuse=("stage1", "stage2")),
        text=masksd.ModalitySpec(embed="word_embed", maskable=masksd.Maskable(ids="ids", never=(PAD,)),
                                 tokens=masksd.Tap("text_encoder", select="[0]"), reuse=("text_encoder",)),
        two_class=True,
    )
    return masksd.HookSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, **changes})


class LossReturningRIS(TinyRIS):
    """CRIS-style: the training forward needs the mask and returns ``(pred.detach(), mask, loss)``."""

    def forward(self, img: Tensor, ids: Tensor, mask: Tensor | None = None):  # type: ignore[override]
        pred = super().forward(img, ids)
        if not self.training:
            return pred
        target = F.interpolate(mask[:, None].float(), size=pred.shape[-2:], mode="nearest")
        loss = F.binary_cross_entropy_with_logits(pred, target)
        return pred.detach(), mask, loss


def make_batch(size: int = 4, seed: int = 0, length: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """``(images [B, 3, 32, 32], ids [B, L] padded with 0, masks [B, 32, 32] bool)``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, SIZE, SIZE, generator=g)
    ids = torch.randint(1, VOCAB, (size, length), generator=g)
    lengths = torch.randint(2, length + 1, (size,), generator=g)
    ids[torch.arange(length)[None] >= lengths[:, None]] = PAD
    masks = torch.rand(size, SIZE, SIZE, generator=g) > 0.5
    return images, ids, masks

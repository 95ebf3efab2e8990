"""A tiny late-fusion RIS model built from a timm ViT, written the way timm-based codebases do it.

``TimmRIS(images, ids)``:

* ``image_encoder``: ``timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
  patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, drop_path_rate=0.1)``, driven
  through the **method** ``image_encoder.forward_features(images)`` -> ``[B, 1 + 64, 32]``, so forward
  hooks on ``image_encoder`` itself never fire; its submodules' do. Image-embedding site:
  ``image_encoder.patch_embed`` (timm ``PatchEmbed``: conv 8x8/8, flattened) -> **bnc**
  ``[B, 64, 32]`` (8x8 grid); the class token is concatenated and ``pos_embed`` added after it,
  out of place. The class token is dropped (``num_prefix_tokens``) and the patch tokens are
  reshaped to ``[B, 32, 8, 8]``.
* ``text_encoder`` (``TextEncoder``): ``token_embedding`` (``nn.Embedding``, word-embedding site,
  ``[B, L, 32]``) + learned ``pos_embedding`` -> ``nn.TransformerEncoder`` (``batch_first``,
  ``src_key_padding_mask = ids == 0``, dropout 0.1) -> ``norm``; sentence feature = mean over
  non-pad words ``[B, 32]``. (In eval under ``torch.no_grad`` PyTorch's fast path may zero the
  outputs at pad positions; the masked mean ignores them either way.)
* ``neck`` (``FusionNeck``): grid * ``txt_proj(sentence)``, conv + BatchNorm + ReLU, upsample x2,
  conv, 1x1 conv -> logits ``[B, 1, H/4, W/4]`` (= 16x16 for 64 px input).

Returns logits ``[B, 1, H/4, W/4]`` in train and eval; loss outside (``bce_loss``). Late fusion:
image features never depend on the text. Every parameter gets a gradient in a training step.
"""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PAD = 0
VOCAB_SIZE = 100


class TextEncoder(nn.Module):
    """``ids [B, L]`` (pad 0) -> (words ``[B, L, D]``, sentence ``[B, D]`` = masked mean)."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, width: int = 32, heads: int = 2, layers: int = 1,
                 context_length: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embedding = nn.Parameter(torch.randn(context_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        pad = ids == PAD
        x = self.token_embedding(ids) + self.pos_embedding[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        sentence = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return x, sentence


class FusionNeck(nn.Module):
    """``grid [B, C, h, w]`` gated by ``sentence [B, D]`` -> logits ``[B, 1, 2h, 2w]``."""

    def __init__(self, vis_dim: int = 32, txt_dim: int = 32, dim: int = 32) -> None:
        super().__init__()
        self.txt_proj = nn.Linear(txt_dim, vis_dim)
        self.fuse = nn.Sequential(nn.Conv2d(vis_dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU())
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(dim // 2),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(dim // 2, 1, 1)

    def forward(self, grid: Tensor, sentence: Tensor) -> Tensor:
        x = grid * self.txt_proj(sentence)[:, :, None, None]
        return self.head(self.up(self.fuse(x)))


class TimmRIS(nn.Module):
    """timm-ViT + small text transformer late-fusion model (see module docstring)."""

    def __init__(self, image_size: int = 64, patch_size: int = 8, width: int = 32) -> None:
        super().__init__()
        self.image_encoder = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=patch_size,
            embed_dim=width, depth=2, num_heads=2, num_classes=0, drop_path_rate=0.1,
        )
        self.text_encoder = TextEncoder(width=width)
        self.neck = FusionNeck(width, width, width)

    def forward(self, images: Tensor, ids: Tensor) -> Tensor:
        """``images [B, 3, H, W]``, ``ids [B, L]`` -> logits ``[B, 1, H/4, W/4]``."""
        tokens = self.image_encoder.forward_features(images)  # [B, 1 + N, C]
        patches = tokens[:, self.image_encoder.num_prefix_tokens :]
        gh, gw = self.image_encoder.patch_embed.grid_size
        grid = rearrange(patches, "b (h w) c -> b c h w", h=gh, w=gw)
        _, sentence = self.text_encoder(ids)
        return self.neck(grid, sentence)


def bce_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """BCE-with-logits against ``mask [B, 1, H, W]`` resized (nearest) to the logits' size."""
    if mask.shape[-2:] != logits.shape[-2:]:
        mask = F.interpolate(mask, size=logits.shape[-2:], mode="nearest")
    return F.binary_cross_entropy_with_logits(logits, mask)


class TimmBatch(NamedTuple):
    """One batch: ``loss = bce_loss(model(images, ids), mask)``."""

    images: Tensor  # [B, 3, H, W] float
    ids: Tensor  # [B, L] long, pad 0
    mask: Tensor  # [B, 1, H, W] float in {0, 1}


def make_batch(batch_size: int = 4, image_size: int = 64, max_tokens: int = 10, seed: int = 0) -> TimmBatch:
    """Random images, word ids in 1..99 of varying length padded with 0, and box masks."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    ids = torch.full((batch_size, max_tokens), PAD, dtype=torch.long)
    masks = torch.zeros(batch_size, 1, image_size, image_size)
    for i in range(batch_size):
        n = max_tokens if i == 0 else int(torch.randint(1, max_tokens + 1, (1,), generator=gen))
        ids[i, :n] = torch.randint(1, VOCAB_SIZE, (n,), generator=gen)
        y0, x0 = torch.randint(0, image_size // 2, (2,), generator=gen).tolist()
        bh, bw = torch.randint(image_size // 4, image_size // 2 + 1, (2,), generator=gen).tolist()
        masks[i, 0, y0 : y0 + bh, x0 : x0 + bw] = 1.0
    return TimmBatch(images, ids, masks)

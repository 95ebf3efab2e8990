"""Tiny pure-torch towers and decoders implementing the masksd tower contract (no open_clip).

Not a test module: imported by the wrapper and DDP tests.

* ``TinyImageTower``: 16×16 images, patch 4 → 16 tokens of width 16; learned positional
  embedding added in ``encode`` (so a mask token keeps its position); one transformer layer;
  per-token projection to ``D`` and global feature = projected mean;
  ``features = {"map": [B, D, 4, 4]}`` (the projected tokens on the grid).
* ``TinyTextTower``: vocabulary 50, ids with ``PAD=0, SOT=1, EOT=2``; maskable = not special;
  one transformer layer with a key padding mask; tokens projected to ``D``; global feature =
  the projected feature at the EOT position (found from ``extras["ids"]``).
* ``TinyDecoder``: gates the image map by the sentence feature, lets every pixel attend to the
  words (padding masked), upsamples to 8×8 and predicts one logit per pixel. It uses the image
  map, the words, the pad mask and the sentence feature, so every parameter of the towers and
  the decoder gets a gradient. ``TinyBNDecoder`` adds a BatchNorm (running statistics).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masksd import DistillOutput, MaskedSelfDistill
from masksd.towers import Embedded, Encoded

PAD, SOT, EOT = 0, 1, 2
VOCAB = 50
IMAGE_SIZE = 16
PATCH = 4
GRID = IMAGE_SIZE // PATCH
NUM_PATCHES = GRID * GRID
MAX_LEN = 8
WIDTH = 16
LOGIT_SIZE = 8

__all__ = [
    "PAD",
    "SOT",
    "EOT",
    "TinyImageTower",
    "TinyTextTower",
    "TinyDecoder",
    "TinyBNDecoder",
    "make_batch",
    "make_model",
    "requires_bf16_masked_attention",
]


def _bf16_masked_attention_runs() -> bool:
    """Whether this torch runs masked attention (``nn.TransformerEncoderLayer`` with a padding mask)
    under CPU bf16 autocast; 2.1.2, 2.2.2 and 2.3.1 fail with "Expected attn_mask dtype to be bool
    or to match query dtype" (open_clip's text tower too), 2.14.1 runs it."""
    layer = _layer(8).eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            layer(torch.zeros(1, 2, 8), src_key_padding_mask=torch.tensor([[False, True]]))
    except RuntimeError:
        return False
    return True


def _layer(width: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        d_model=width, nhead=2, dim_feedforward=2 * width, dropout=0.0, batch_first=True
    )


# torch's limit, not masksd's: on those releases the bare models fail under CPU bf16 autocast
requires_bf16_masked_attention = pytest.mark.skipif(
    not _bf16_masked_attention_runs(), reason="this torch's masked attention fails under CPU bf16 autocast"
)


class TinyImageTower(nn.Module):
    """Patchify conv (embed) → +pos, transformer layer, projection (encode)."""

    def __init__(self, width: int = WIDTH, out_dim: int = WIDTH) -> None:
        super().__init__()
        self.embed_dim = width
        self.patch = nn.Conv2d(3, width, kernel_size=PATCH, stride=PATCH)
        self.pos = nn.Parameter(torch.randn(NUM_PATCHES, width) * 0.02)
        self.layer = _layer(width)
        self.proj = nn.Linear(width, out_dim)

    def embed(self, images: Tensor) -> Embedded:
        patches = self.patch(images)  # [B, C, 4, 4]
        tokens = patches.flatten(2).transpose(1, 2)  # [B, 16, C]
        maskable = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Embedded(tokens=tokens, maskable=maskable, extras={"grid": tuple(patches.shape[-2:])})

    def encode(self, embedded: Embedded) -> Encoded:
        x = embedded.tokens + self.pos.to(embedded.tokens.dtype)
        x = self.layer(x)
        tokens = self.proj(x)  # [B, N, D]
        gh, gw = embedded.extras["grid"]
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)
        return Encoded(tokens=tokens, global_feature=tokens.mean(dim=1), features={"map": feature_map})


class TinyTextTower(nn.Module):
    """Word embedding (embed) → +pos, transformer layer with key padding mask, projection."""

    def __init__(self, width: int = WIDTH, out_dim: int = WIDTH) -> None:
        super().__init__()
        self.embed_dim = width
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(MAX_LEN, width) * 0.02)
        self.layer = _layer(width)
        self.proj = nn.Linear(width, out_dim)

    def embed(self, ids: Tensor) -> Embedded:
        tokens = self.token_embedding(ids)
        maskable = (ids != PAD) & (ids != SOT) & (ids != EOT)
        return Embedded(tokens=tokens, maskable=maskable, extras={"ids": ids})

    def encode(self, embedded: Embedded) -> Encoded:
        ids: Tensor = embedded.extras["ids"]
        pad_mask = ids == PAD
        x = embedded.tokens + self.pos[: ids.shape[1]].to(embedded.tokens.dtype)
        x = self.layer(x, src_key_padding_mask=pad_mask)
        tokens = self.proj(x)  # [B, L, D]
        eot = (ids == EOT).int().argmax(dim=1)
        sentence = tokens[torch.arange(ids.shape[0], device=ids.device), eot]
        return Encoded(
            tokens=tokens,
            global_feature=sentence,
            features={"words": tokens, "pad_mask": pad_mask, "sentence": sentence},
        )


class TinyDecoder(nn.Module):
    """Sentence-gated image map + word cross-attention → ``[B, 1, 8, 8]`` logits."""

    def __init__(self, image_dim: int = WIDTH, text_dim: int = WIDTH, hidden: int = WIDTH) -> None:
        super().__init__()
        self.image_in = nn.Conv2d(image_dim, hidden, kernel_size=1)
        self.sentence_in = nn.Linear(text_dim, hidden)
        self.words_in = nn.Linear(text_dim, hidden)
        self.out = nn.Conv2d(hidden, 1, kernel_size=3, padding=1)
        self.scale = hidden**-0.5

    def _image(self, feature_map: Tensor) -> Tensor:
        return self.image_in(feature_map)

    def forward(self, image: Encoded, text: Encoded) -> Tensor:
        f = self._image(image.features["map"])  # [B, H, 4, 4]
        f = f * torch.sigmoid(self.sentence_in(text.features["sentence"]))[:, :, None, None]
        words = self.words_in(text.features["words"])  # [B, L, H]
        attn = torch.einsum("bchw,blc->bhwl", f, words) * self.scale
        attn = attn.masked_fill(text.features["pad_mask"][:, None, None, :], float("-inf"))
        context = torch.einsum("bhwl,blc->bchw", attn.softmax(dim=-1), words)
        f = F.interpolate(f + context, size=(LOGIT_SIZE, LOGIT_SIZE), mode="bilinear", align_corners=False)
        return self.out(F.gelu(f))


class TinyBNDecoder(TinyDecoder):
    """``TinyDecoder`` with a BatchNorm on the image map (has running-statistics buffers)."""

    def __init__(self, image_dim: int = WIDTH, text_dim: int = WIDTH, hidden: int = WIDTH) -> None:
        super().__init__(image_dim, text_dim, hidden)
        self.bn = nn.BatchNorm2d(hidden)

    def _image(self, feature_map: Tensor) -> Tensor:
        return self.bn(self.image_in(feature_map))


def make_batch(batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(images [B, 3, 16, 16], ids [B, 8], target [B, 16, 16] float)``.

    Each id row is ``SOT, 1-5 words (ids 3..49), EOT, PAD...``; targets are random rectangles.
    """
    g = generator
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    ids = torch.full((batch_size, MAX_LEN), PAD, dtype=torch.long)
    target = torch.zeros(batch_size, IMAGE_SIZE, IMAGE_SIZE)
    for b in range(batch_size):
        words = int(torch.randint(1, 6, (1,), generator=g))
        ids[b, 0] = SOT
        ids[b, 1 : 1 + words] = torch.randint(3, VOCAB, (words,), generator=g)
        ids[b, 1 + words] = EOT
        y0, x0 = (int(v) for v in torch.randint(0, IMAGE_SIZE // 2, (2,), generator=g))
        h, w = (int(v) for v in torch.randint(2, IMAGE_SIZE // 2 + 1, (2,), generator=g))
        target[b, y0 : y0 + h, x0 : x0 + w] = 1.0
    return images, ids, target


def make_model(
    seed: int = 0, *, text_dim: int = WIDTH, batch_norm: bool = False
) -> tuple[TinyImageTower, TinyTextTower, TinyDecoder]:
    """``(image_tower, text_tower, decoder)`` initialised deterministically from ``seed``.

    ``text_dim`` sets the text tower's output width D (the image tower's is 16); the decoder
    matches it. The global RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_tower = TinyImageTower()
        text_tower = TinyTextTower(out_dim=text_dim)
        decoder_cls = TinyBNDecoder if batch_norm else TinyDecoder
        decoder = decoder_cls(image_dim=WIDTH, text_dim=text_dim)
    return image_tower, text_tower, decoder


def tiny_wrapper(
    seed: int = 0, *, text_dim: int = 16, batch_norm: bool = False, **kwargs
) -> MaskedSelfDistill:
    """``MaskedSelfDistill`` over ``make_model(seed)``; the mask tokens drawn from a forked RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000)  # mask tokens are drawn from the global RNG
        image_tower, text_tower, decoder = make_model(seed, text_dim=text_dim, batch_norm=batch_norm)
        return MaskedSelfDistill(image_tower, text_tower, decoder, **kwargs)


def tiny_batch(size: int = 4, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return make_batch(size, torch.Generator().manual_seed(seed))


def tiny_step(wrapper: MaskedSelfDistill, data=None, seed: int = 0) -> DistillOutput:
    """One training forward with a fixed mask generator."""
    images, ids, target = data if data is not None else tiny_batch()
    wrapper.train()
    out = wrapper(images, ids, target, generator=torch.Generator().manual_seed(seed))
    assert isinstance(out, DistillOutput)
    return out


def assert_all_grads(module: nn.Module, prefix: str = "") -> None:
    """Every parameter (whose name starts with ``prefix``) has a finite gradient."""
    named = [(n, p) for n, p in module.named_parameters() if n.startswith(prefix)]
    assert named, f"no parameters under {prefix!r}"
    missing = [n for n, p in named if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"

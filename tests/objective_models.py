"""Tiny models and builders for the auxiliary-objective tests (not a test module).

* ``FusedTinyDecoder``: ``tiny_models.TinyDecoder`` that also exposes its fused map ``[B, 16, 4, 4]``
  (the sentence-gated image map plus the word context, before upsampling) through the optional
  ``forward_with_fused`` protocol; it counts its passes.
* ``fused_spec``: ``hook_models.tiny_spec`` plus ``HookSpec.fused`` on the input of ``TinyRIS.decoder``.
* ``all_objectives``: one of each objective (CAL on the encoders' and on the fused features),
  sized for both tiny models (every width is 16).
"""

from __future__ import annotations

import hook_models
import tiny_models
import torch
import torch.nn.functional as F
from tiny_models import assert_all_grads  # noqa: F401  (re-exported for the objective tests)
from torch import Tensor

import masksd
from masksd import MaskedSelfDistill
from masksd.objectives import (
    CrossModalAlignment,
    CrossModalAlignmentConfig,
    LanguageReconstruction,
    LanguageReconstructionConfig,
    MaskGrounding,
    MaskGroundingConfig,
)
from masksd.towers import Encoded

WIDTH = 16
SMALL = dict(width=16, layers=1, heads=2, ffn=32)  # predictor / reconstructor sizes for tests


class FusedTinyDecoder(tiny_models.TinyDecoder):
    """``TinyDecoder`` with ``forward_with_fused`` (same logits) and a pass counter."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.passes = 0
        self.last_fused: Tensor | None = None

    def forward_with_fused(self, image: Encoded, text: Encoded) -> tuple[Tensor, Tensor]:
        self.passes += 1
        f = self._image(image.features["map"])
        f = f * torch.sigmoid(self.sentence_in(text.features["sentence"]))[:, :, None, None]
        words = self.words_in(text.features["words"])
        attn = torch.einsum("bchw,blc->bhwl", f, words) * self.scale
        attn = attn.masked_fill(text.features["pad_mask"][:, None, None, :], float("-inf"))
        fused = f + torch.einsum("bhwl,blc->bchw", attn.softmax(dim=-1), words)  # [B, 16, 4, 4]
        self.last_fused = fused
        up = F.interpolate(fused, size=(tiny_models.LOGIT_SIZE,) * 2, mode="bilinear", align_corners=False)
        return self.out(F.gelu(up)), fused

    def forward(self, image: Encoded, text: Encoded) -> Tensor:
        return self.forward_with_fused(image, text)[0]


def fused_spec(**changes: object) -> masksd.HookSpec:
    """The README spec of ``TinyRIS`` with the decoder's input ``v * s`` ``[B, 16, 4, 4]`` as fused
    features."""
    fused = masksd.Tap("decoder", kind="input", select="[0]", layout="bchw")
    return hook_models.tiny_spec(fused=fused, **changes)


ALL_OBJECTIVES = ("mask_grounding", "cal", "lang_rec", "cal_fused")  # names of all_objectives(), in order


def all_objectives(
    *, mg: dict | None = None, cal: dict | None = None, rec: dict | None = None,
    cal_fused: dict | None = None, seed: int = 7,
) -> list[masksd.Objective]:
    """``[MaskGrounding, CrossModalAlignment, LanguageReconstruction, CrossModalAlignment(features=
    "fused", name="cal_fused")]`` for the tiny models (both expose fused features)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [
            MaskGrounding(word_dim=WIDTH, text_dim=WIDTH, image_dim=WIDTH,
                          config=MaskGroundingConfig(**{**SMALL, "dropout": 0.0, **(mg or {})})),
            CrossModalAlignment(config=CrossModalAlignmentConfig(**(cal or {}))),
            LanguageReconstruction(fused_dim=WIDTH, text_dim=WIDTH,
                                   config=LanguageReconstructionConfig(
                                       **{**SMALL, "dropout": 0.0, **(rec or {})})),
            CrossModalAlignment(config=CrossModalAlignmentConfig(
                                    **{"features": "fused", **(cal_fused or {})}),
                                text_dim=WIDTH, fused_dim=WIDTH, name="cal_fused"),
        ]


def towers_wrapper(objectives=(), seed: int = 0, **options) -> MaskedSelfDistill:
    """The tiny towers with ``FusedTinyDecoder``, deterministic from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_tower, text_tower, _ = tiny_models.make_model(seed)
        decoder = FusedTinyDecoder()
        torch.manual_seed(seed + 1000)
        return MaskedSelfDistill(image_tower, text_tower, decoder, extra_objectives=list(objectives),
                                 **options)


def hooks_wrapper(objectives=(), seed: int = 0, model_cls=None, spec=None, **options) -> MaskedSelfDistill:
    """``TinyRIS`` (or ``model_cls``) wrapped with ``fused_spec()`` (or ``spec``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (model_cls or hook_models.TinyRIS)()
        torch.manual_seed(seed + 1000)
        return masksd.wrap(model, spec if spec is not None else fused_spec(),
                           extra_objectives=list(objectives), **options)


def towers_batch(size: int = 4, seed: int = 0):
    return tiny_models.make_batch(size, torch.Generator().manual_seed(seed))


def hooks_batch(size: int = 4, seed: int = 0):
    """``hook_models.make_batch`` with solid rectangles as targets (its noise masks leave no
    background cell on the 4×4 grid)."""
    images, ids, _ = hook_models.make_batch(size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.zeros(size, hook_models.SIZE, hook_models.SIZE, dtype=torch.bool)
    for b in range(size):
        y0, x0 = (int(v) for v in torch.randint(0, 16, (2,), generator=g))
        h, w = (int(v) for v in torch.randint(4, 17, (2,), generator=g))
        target[b, y0 : y0 + h, x0 : x0 + w] = True
    return images, ids, target


def train_step(wrapper: MaskedSelfDistill, data, seed: int = 0):
    """One training forward with a fixed mask generator; returns the ``DistillOutput``."""
    images, ids, target = data
    wrapper.train()
    return wrapper(images, ids, target=target, generator=torch.Generator().manual_seed(seed))

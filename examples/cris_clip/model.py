"""The reference model: open_clip ViT + text towers (through masksd's adapter) + CRIS head.

``build_model(preset)`` returns the bare ``masksd.RISModel``; wrap it for training with
``wrap_model(model, ...)`` (a thin call to ``masksd.MaskedSelfDistill``).

Presets:

* ``demo``: a tiny random-init CLIP (64 px, patch 8) and a small head, trains on a CPU in
  minutes on the synthetic dataset.
* ``vitb16``: the paper's setting: ``ViT-B-16`` at 480 px (ablations; 576 px for the main
  table via ``--image-size 576``), CRIS head at its published size.
* ``vitl14``: ``ViT-L-14`` at 480 px.

Real weights load through open_clip's own path: ``pretrained="openai"`` (or another tag) or a
local checkpoint file; nothing downloads unless the user asks for a tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import open_clip
import torch
from cris_head import CRISHead
from torch import Tensor, nn

from masksd import Encoded, MaskedSelfDistill, RISModel
from masksd.adapters.open_clip import towers_from_open_clip

__all__ = ["Preset", "PRESETS", "CRISDecoder", "build_model", "build_clip", "wrap_model"]


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Everything that defines a reference model's architecture and input size."""

    clip_model: str | None  # open_clip config name; None = the tiny ``clip_cfg`` below
    image_size: int
    context_length: int = 17
    clip_cfg: dict[str, Any] = field(default_factory=dict)
    image_layers: tuple[int, ...] = (3, 7)  # intermediate levels; the projected output is the last
    head_dim: int = 512
    head_layers: int = 3
    head_heads: int = 8
    head_ffn: int = 2048
    head_proj_dim: int = 256
    dropout: float = 0.1


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        clip_model=None,
        image_size=64,
        clip_cfg=dict(
            embed_dim=64,
            vision_cfg=dict(image_size=64, patch_size=8, width=64, layers=4, head_width=16),
            text_cfg=dict(context_length=17, vocab_size=49408, width=64, heads=4, layers=4),
        ),
        image_layers=(1, 2),
        head_dim=64,
        head_layers=1,
        head_heads=4,
        head_ffn=128,
        head_proj_dim=32,
        dropout=0.0,
    ),
    "vitb16": Preset(clip_model="ViT-B-16", image_size=480, image_layers=(3, 7)),
    "vitl14": Preset(clip_model="ViT-L-14", image_size=480, image_layers=(7, 15)),
}


def build_clip(preset: Preset, *, pretrained: str | None = None) -> nn.Module:
    """An open_clip CLIP for ``preset`` (random init unless ``pretrained`` is a tag or a file)."""
    if preset.clip_model is None:
        if pretrained:
            raise ValueError("the demo preset has no pretrained weights; drop --pretrained")
        return open_clip.CLIP(**preset.clip_cfg)
    return open_clip.create_model(
        preset.clip_model, pretrained=pretrained, force_image_size=preset.image_size
    )


class CRISDecoder(nn.Module):
    """Adapts the CRIS head to masksd's ``decoder(image: Encoded, text: Encoded)`` contract.

    Levels = the requested intermediate ViT layers ``[B, width, gh, gw]`` plus the final
    CLIP-projected patch tokens ``[B, embed_dim, gh, gw]`` (the deepest level, gated by the
    sentence); words = the text transformer's output before projection (as CRIS); sentence =
    the projected sentence feature.
    """

    def __init__(self, head: CRISHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, image: Encoded, text: Encoded) -> Tensor:
        gh, gw = image.features["grid"]
        final = image.tokens.transpose(1, 2).reshape(image.tokens.shape[0], -1, gh, gw)
        levels = [*image.features["levels"], final]
        words = text.features["words"]
        return self.head(levels, text.global_feature, words, text.features["pad_mask"])


def build_model(
    preset: str | Preset = "demo", *, pretrained: str | None = None, image_size: int | None = None
) -> RISModel:
    """The bare reference model for ``preset`` (a name from ``PRESETS`` or a ``Preset``)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    if image_size is not None and image_size != preset.image_size:
        if preset.clip_model is None:
            raise ValueError("the demo preset has a fixed image size")
        preset = replace(preset, image_size=image_size)
    clip = build_clip(preset, pretrained=pretrained)
    image_tower, text_tower = towers_from_open_clip(clip, image_layers=preset.image_layers)
    width = image_tower.embed_dim
    joint_dim = int(image_tower.visual.output_dim)
    head = CRISHead(
        vis_dim=[width] * len(preset.image_layers) + [joint_dim],
        text_dim=joint_dim,
        word_dim=text_tower.embed_dim,
        num_levels=len(preset.image_layers) + 1,
        dim=preset.head_dim,
        num_layers=preset.head_layers,
        nhead=preset.head_heads,
        dim_feedforward=preset.head_ffn,
        dropout=preset.dropout,
        proj_dim=preset.head_proj_dim,
    )
    model = RISModel(image_tower, text_tower, CRISDecoder(head))
    model.preset = preset  # type: ignore[assignment]
    return model


def wrap_model(model: RISModel, **kwargs: Any) -> MaskedSelfDistill:
    """``MaskedSelfDistill`` around the reference model's towers and decoder."""
    return MaskedSelfDistill(model.image_tower, model.text_tower, model.decoder, **kwargs)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":  # quick smoke run: python examples/cris_clip/model.py
    net = build_model("demo")
    x = torch.randn(2, 3, 64, 64)
    t = torch.randint(1, 1000, (2, 17))
    print(net(x, t).shape, count_parameters(net))

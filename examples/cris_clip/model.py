"""The reference RIS model: open_clip ViT and text towers (through masksd's adapter) + a CRIS head.

``build_model(config)`` returns the bare ``masksd.towers.RISModel(image_tower, text_tower, decoder)``;
``train.py`` wraps it with ``masksd.MaskedSelfDistill``. :data:`MODEL_CONFIGS` holds the three
architectures: ``demo`` (a tiny CLIP, random init or ``pretrain_clip.py``'s weights, 64 px, patch 8,
trains on a CPU in minutes), ``vitb16`` and ``vitl14`` (the paper's backbones at 480 px, CRIS head at
its published size).

The CRIS head (Wang et al., CVPR 2022, ``model/layers.py``) is :class:`CRISNeck` (sentence-gated
fusion of the ViT levels, CoordConv) → :class:`VisionLanguageDecoder` (self-attention over the
visual tokens, cross-attention to the words) → :class:`Projector` (upsampling ×4, a per-sample
3×3 convolution whose kernel comes from the sentence). Differences from CRIS's ResNet version:

* a ViT has one stride, so every level lies on the same ``h×w`` grid and the neck drops CRIS's
  resampling between levels (the top-down cascade, projections, ``aggr`` and CoordConv stay);
* ``txt_proj`` is ``Linear + ReLU`` (CRIS's BatchNorm1d fails on a training batch of one);
* words are projected to the head width when it differs from the text width, and the levels
  may have different widths (intermediate ViT layers, then the CLIP-projected tokens).

The head's modules live in ``cris_head.py``; this module imports only that sibling, by plain name in a
script run and relatively as ``examples.cris_clip.model``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import open_clip
from einops import rearrange
from torch import Tensor, nn

try:  # a script run of this folder (train.py) imports siblings by plain name
    from cris_head import CRISHead
except ModuleNotFoundError:  # imported as examples.cris_clip.model (tests, benchmarks)
    from .cris_head import CRISHead
from masksd import HookSpec, Maskable, ModalitySpec, Objective, Tap
from masksd.adapters.open_clip import towers_from_open_clip
from masksd.objectives import (
    CrossModalAlignment,
    CrossModalAlignmentConfig,
    LanguageReconstruction,
    LanguageReconstructionConfig,
    MaskGrounding,
    MaskGroundingConfig,
    MaskRIS,
    MaskRISConfig,
)
from masksd.towers import Encoded, RISModel


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and initial weights. Fields with ``help`` become command-line flags."""

    clip_model: str | None = None  # open_clip config name; None = the tiny ``clip_cfg`` below
    clip_cfg: dict[str, Any] = field(default_factory=dict)  # open_clip.CLIP kwargs (clip_model=None)
    pretrained: str | None = field(default=None, metadata={"help": (
        "open_clip pretrained tag (e.g. openai) or a local checkpoint file; demo: a file of the same "
        "architecture, e.g. pretrain_clip.py's open_clip_pytorch_model.bin (none: random init)")})
    image_size: int = field(default=64, metadata={"help": (
        "input side in pixels (vitb16/vitl14: 480 for the ablations, 576 for the paper's main table)")})
    image_layers: tuple[int, ...] = (3, 7)  # intermediate ViT levels; the projected output is the last
    dense_scoring: Literal["none", "value", "clearclip"] = field(default="none", metadata={"help": (
        "patch features the scorers read: none = plain patch tokens (paper), value = MaskCLIP's value path, "
        "clearclip = q-q attention, from the last ViT block (masksd.adapters.clip_dense)")})
    head_dim: int = 512
    head_layers: int = 3
    head_heads: int = 8
    head_ffn: int = 2048
    head_proj_dim: int = 256
    dropout: float = 0.1


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "demo": ModelConfig(
        clip_cfg=dict(
            embed_dim=64,
            vision_cfg=dict(image_size=64, patch_size=8, width=64, layers=4, head_width=16),
            text_cfg=dict(context_length=17, vocab_size=49408, width=64, heads=4, layers=4),
        ),
        image_size=64, image_layers=(1, 2), head_dim=64, head_layers=1, head_heads=4, head_ffn=128,
        head_proj_dim=32, dropout=0.0,
    ),
    "vitb16": ModelConfig(clip_model="ViT-B-16", image_size=480, image_layers=(3, 7)),
    "vitl14": ModelConfig(clip_model="ViT-L-14", image_size=480, image_layers=(7, 15)),
}
MODEL_CONFIGS["v2"] = replace(MODEL_CONFIGS["demo"], image_size=96)  # world v2 (world_v2.py): 12×12 patches


def build_model(config: ModelConfig) -> RISModel:
    """The bare model: open_clip CLIP (random init unless ``config.pretrained``) + CRIS head."""
    if config.clip_model is None:
        vision = dict(config.clip_cfg["vision_cfg"], image_size=config.image_size)
        clip = open_clip.CLIP(**dict(config.clip_cfg, vision_cfg=vision))
        if config.pretrained:
            # a local file, read by the loader that create_model(name, pretrained=<file>) calls: strict,
            # unwraps "state_dict" / "module.", resizes the position embeddings to the image size
            if not os.path.isfile(config.pretrained):
                raise FileNotFoundError(
                    f"--pretrained {config.pretrained}: no such file (a model without clip_model takes a "
                    "checkpoint file of its clip_cfg, e.g. from examples/cris_clip/pretrain_clip.py)")
            open_clip.load_checkpoint(clip, config.pretrained)
    else:
        clip = open_clip.create_model(config.clip_model, pretrained=config.pretrained,
                                      force_image_size=config.image_size)
    dense = None if config.dense_scoring == "none" else config.dense_scoring
    image_tower, text_tower = towers_from_open_clip(clip, image_layers=config.image_layers, dense=dense)
    joint_dim = int(image_tower.visual.output_dim)
    head = CRISHead(
        vis_dim=[image_tower.embed_dim] * len(config.image_layers) + [joint_dim],
        text_dim=joint_dim, word_dim=text_tower.embed_dim, num_levels=len(config.image_layers) + 1,
        dim=config.head_dim, num_layers=config.head_layers, nhead=config.head_heads,
        dim_feedforward=config.head_ffn, dropout=config.dropout, proj_dim=config.head_proj_dim,
    )
    return RISModel(image_tower, text_tower, CRISDecoder(head))


class CRISDecoder(nn.Module):
    """The CRIS head behind masksd's ``decoder(image: Encoded, text: Encoded)`` contract.

    Levels: the intermediate ViT layers ``[B, width, gh, gw]`` and the CLIP-projected patch tokens
    ``[B, embed_dim, gh, gw]`` (deepest, gated by the sentence); words: the text transformer's
    output before projection ``[B, L, width]`` (as CRIS); sentence: the projected sentence ``[B, D]``.
    Returns logits ``[B, 1, 4gh, 4gw]``.
    """

    def __init__(self, head: CRISHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, image: Encoded, text: Encoded) -> Tensor:
        return self.forward_with_fused(image, text)[0]

    def forward_with_fused(self, image: Encoded, text: Encoded) -> tuple[Tensor, Tensor]:
        """``(logits, fused [B, head_dim, gh, gw])``; masksd's objectives that read the decoder's
        fused features (language reconstruction, alignment on fused features) use this."""
        gh, gw = image.features["grid"]
        final = rearrange(image.tokens, "b (h w) d -> b d h w", h=gh, w=gw)
        levels = [*image.features["levels"], final]
        return self.head.forward_with_fused(levels, text.global_feature, text.features["words"],
                                            text.features["pad_mask"])


def hook_spec() -> HookSpec:
    """How ``masksd.wrap`` finds its way around the bare model (the tower path needs none).

    The decoder is called as a module with the two towers' outputs, so its inputs carry the
    CLIP-space scoring features; the ViT blocks and the text transformer are reused across
    branches (late fusion). ``fused`` is the vision-language decoder's output ``fq [B, dim, gh, gw]``,
    the same tensor ``CRISDecoder.forward_with_fused`` returns (for ``lang_rec`` and ``cal_fused``).
    Through hooks the model selects, scores and computes every objective's loss exactly as through
    its towers (tests/test_hooks_reference.py).
    """
    return HookSpec(
        image=ModalitySpec(
            embed="image_tower.visual.conv1", layout="bchw",
            tokens=Tap("decoder", kind="input", select="[0].tokens"),
            global_=Tap("decoder", kind="input", select="[0].global_feature"),
            reuse=("image_tower.visual.transformer.resblocks.*", "image_tower.visual.ln_post"),
        ),
        text=ModalitySpec(
            embed="text_tower.token_embedding",
            maskable=Maskable(ids="texts", never=(0, 49406, 49407)),  # pad, SOT, EOT
            tokens=Tap("decoder", kind="input", select="[1].tokens"),
            global_=Tap("decoder", kind="input", select="[1].global_feature"),
            reuse=("text_tower.transformer",),
        ),
        fused=Tap("decoder.head.decoder", layout="bchw"),  # VisionLanguageDecoder: one call per forward
    )


EXTRA_OBJECTIVES = ("mask_grounding", "cal", "cal_fused", "lang_rec", "maskris")


def maskris_patch_size(image_size: int) -> int:
    """MaskRIS's image patch for this input side: about 1/14 of it, as MaskRIS's 32 px at 448 px,
    rounded down to a multiple of 8 and at least 8 (demo 64 px: 8; v2 96 px: 8; 480 px: 32)."""
    return max(8, image_size // 14 // 8 * 8)


def build_objectives(names: Sequence[str], model: RISModel, config: ModelConfig) -> list[Objective]:
    """The further objectives named in ``names`` (``--objectives``), sized for ``model``.

    ``mask_grounding`` (MagNet's Mask Grounding), ``cal`` / ``cal_fused`` (MagNet's cross-modal
    alignment on the encoders' / the decoder's features), ``lang_rec`` (CRFormer's language
    reconstruction). Their heads take the CRIS head's width, so the demo's stay small.
    ``maskris`` (Lee et al.): one extra full pass on zeroed patches and BERT-style corrupted ids;
    CLIP has no [MASK] id, so the masked words get the pad id 0 (the CRIS decoder then ignores them as
    padding; the text encoder sees the pad embedding). Set seg_weight=0.5 for MaskRIS's 0.5/0.5 total.
    """
    words, joint = model.text_tower.embed_dim, int(model.image_tower.visual.output_dim)
    size = dict(width=config.head_dim, heads=config.head_heads, ffn=config.head_ffn)
    built = {
        "mask_grounding": lambda: MaskGrounding(word_dim=words, text_dim=joint, image_dim=joint,
                                                config=MaskGroundingConfig(**size)),
        "cal": lambda: CrossModalAlignment(),
        "cal_fused": lambda: CrossModalAlignment(config=CrossModalAlignmentConfig(features="fused"),
                                                 text_dim=joint, fused_dim=config.head_dim, name="cal_fused"),
        "lang_rec": lambda: LanguageReconstruction(fused_dim=config.head_dim, text_dim=joint,
                                                   config=LanguageReconstructionConfig(**size)),
        "maskris": lambda: MaskRIS(MaskRISConfig(patch_size=maskris_patch_size(config.image_size),
                                                 mask_id=0)),
    }
    unknown = [n for n in names if n not in built]
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; choose from lmvsd, vmlsd, {', '.join(built)}")
    return [built[name]() for name in names]


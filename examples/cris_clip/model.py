"""The reference RIS model: open_clip ViT and text towers (through masksd's adapter) + a CRIS head.

``build_model(config)`` returns the bare ``masksd.RISModel(image_tower, text_tower, decoder)``;
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

This module imports no sibling module, so it can also be imported as ``examples.cris_clip.model``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from masksd import Encoded, HookSpec, Maskable, ModalitySpec, Objective, RISModel, Tap
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
    image_tower, text_tower = towers_from_open_clip(clip, image_layers=config.image_layers,
                                                    dense=None if config.dense_scoring == "none" else config.dense_scoring)
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


# ------------------------------------------------------------------------------------ CRIS head
def conv_bn_relu(in_dim: int, out_dim: int, kernel_size: int = 3) -> nn.Sequential:
    """CRIS ``conv_layer``: Conv2d (no bias, 'same' padding) + BatchNorm2d + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=True),
    )


def pos1d(dim: int, length: int, *, device: torch.device | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """1-D sine position encoding (CRIS ``TransformerDecoder.pos1d``): ``[length, dim]``."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                    * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe.to(dtype)


def pos2d(dim: int, height: int, width: int, *, device: torch.device | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """2-D sine position encoding (CRIS ``pos2d``): ``[height*width, dim]``, row-major tokens;
    the first ``dim/2`` channels encode the column, the last ``dim/2`` the row."""
    half = dim // 2
    pe = torch.cat([repeat(pos1d(half, width, device=device), "w c -> h w c", h=height),
                    repeat(pos1d(half, height, device=device), "h c -> h w c", w=width)], dim=-1)
    return rearrange(pe, "h w c -> (h w) c").to(dtype)


class CoordConv(nn.Module):
    """Append x/y coordinate channels in ``[-1, 1]``, then conv+BN+ReLU: ``[B, C, h, w] -> [B, out, h, w]``."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_dim + 2, out_dim, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        coord = torch.stack([repeat(xs, "w -> b h w", b=b, h=h), repeat(ys, "h -> b h w", b=b, w=w)], dim=1)
        return self.conv(torch.cat([x, coord], dim=1))


class CRISNeck(nn.Module):
    """Sentence-gated multi-level fusion (CRIS ``FPN``) for single-stride ViT features.

    ``levels``: ``num_levels`` tensors ``[B, vis_dims[i], h, w]``, shallow → deep (the deepest is
    gated by the sentence); ``sentence``: ``[B, text_dim]``. Returns ``[B, dim, h, w]``.
    """

    def __init__(self, vis_dims: Sequence[int], text_dim: int, dim: int = 512) -> None:
        super().__init__()
        n = self.num_levels = len(vis_dims)
        # deepest level: 1×1 projection (CRIS f1_v_proj); the others 3×3 (f2/f3_v_proj)
        self.in_proj = nn.ModuleList(conv_bn_relu(vis_dims[i], dim, 1 if i == n - 1 else 3) for i in range(n))
        self.txt_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.ReLU(inplace=True))
        self.gate_norm = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        # top-down cascade: level i fused with the (already fused) level i+1 (CRIS f2/f3_cat)
        self.fuse = nn.ModuleList(conv_bn_relu(2 * dim, dim, 1) for _ in range(n - 1))
        self.out_proj = nn.ModuleList(conv_bn_relu(dim, dim, 3) for _ in range(n))
        self.aggr = conv_bn_relu(n * dim, dim, 1)
        self.coordconv = nn.Sequential(CoordConv(dim, dim, 3), conv_bn_relu(dim, dim, 3))

    def forward(self, levels: Sequence[Tensor], sentence: Tensor) -> Tensor:
        txt = rearrange(self.txt_proj(sentence), "b c -> b c 1 1")
        deepest = self.num_levels - 1
        fused = [self.gate_norm(self.in_proj[deepest](levels[deepest]) * txt)]
        for i in range(deepest - 1, -1, -1):
            fused.insert(0, self.fuse[i](torch.cat([self.in_proj[i](levels[i]), fused[0]], dim=1)))
        out = torch.cat([proj(f) for proj, f in zip(self.out_proj, fused)], dim=1)
        return self.coordconv(self.aggr(out))


class VisionLanguageDecoderLayer(nn.Module):
    """One CRIS ``TransformerDecoderLayer`` (batch first), pre-norm residual blocks as in CRIS:
    ``x + drop(norm_out(attn(norm_in(x))))`` for self- and cross-attention, then
    ``x + drop(ffn(norm(x)))`` with ``Linear → ReLU → Dropout → LayerNorm → Linear``.

    ``vis [B, N, d]``, ``txt [B, L, d]``, ``vis_pos [N, d]``, ``txt_pos [L, d]``,
    ``pad_mask [B, L]`` (True = padding) → ``[B, N, d]``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.LayerNorm(dim_feedforward), nn.Linear(dim_feedforward, d_model))
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, vis: Tensor, txt: Tensor, vis_pos: Tensor, txt_pos: Tensor, pad_mask: Tensor) -> Tensor:
        x = self.norm1(vis)
        q = x + vis_pos
        x = self.self_attn(q, q, x, need_weights=False)[0]
        vis = vis + self.dropout1(self.self_attn_norm(x))
        x = self.norm2(vis)
        x = self.cross_attn(x + vis_pos, txt + txt_pos, txt, key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(x))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class VisionLanguageDecoder(nn.Module):
    """CRIS ``TransformerDecoder``: visual tokens attend to themselves and to the words.

    ``vis [B, dim, h, w]``, ``words [B, L, word_dim]``, ``word_pad_mask [B, L]`` bool (True =
    padding) → ``[B, dim, h, w]``. A sample whose words are all padding would make the
    cross-attention NaN; CLIP tokens cannot (SOT/EOT are never padding).
    """

    def __init__(self, dim: int = 512, word_dim: int = 512, num_layers: int = 3, nhead: int = 8,
                 dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.word_proj: nn.Module = nn.Identity() if word_dim == dim else nn.Linear(word_dim, dim)
        self.layers = nn.ModuleList(
            VisionLanguageDecoderLayer(dim, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, vis: Tensor, words: Tensor, word_pad_mask: Tensor) -> Tensor:
        _, c, h, w = vis.shape
        txt = self.word_proj(words)
        vis_pos = pos2d(c, h, w, device=vis.device, dtype=vis.dtype)
        txt_pos = pos1d(c, txt.shape[1], device=txt.device, dtype=txt.dtype)
        x = rearrange(vis, "b c h w -> b (h w) c")
        for layer in self.layers:
            x = layer(x, txt, vis_pos, txt_pos, word_pad_mask)
        return rearrange(self.norm(x), "b (h w) c -> b c h w", h=h, w=w)


def dynamic_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-sample convolution to one channel as one grouped conv: ``x [B, C, H, W]``,
    ``weight [B, C, k, k]`` (k odd), ``bias [B]`` → ``[B, 1, H, W]`` (sample b uses ``weight[b]``)."""
    out = F.conv2d(rearrange(x, "b c h w -> 1 (b c) h w"), weight, bias=bias,
                   padding=weight.shape[-1] // 2, groups=x.shape[0])
    return rearrange(out, "1 b h w -> b 1 h w")


class Projector(nn.Module):
    """CRIS ``Projector``: ``x [B, dim, h, w]``, ``sentence [B, text_dim]`` → logits ``[B, 1, 4h, 4w]``."""

    def __init__(self, dim: int = 512, text_dim: int = 512, proj_dim: int = 256, kernel_size: int = 3) -> None:
        super().__init__()
        self.proj_dim = proj_dim
        self.kernel_size = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(dim, dim, 3),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(dim, proj_dim, 3),
            nn.Conv2d(proj_dim, proj_dim, 1),
        )
        self.txt = nn.Linear(text_dim, proj_dim * kernel_size * kernel_size + 1)

    def forward(self, x: Tensor, sentence: Tensor) -> Tensor:
        x = self.vis(x)
        params = self.txt(sentence)
        weight = rearrange(params[:, :-1], "b (c kh kw) -> b c kh kw", c=self.proj_dim, kh=self.kernel_size)
        # under autocast the conv runs in the low dtype; keep x and kernel in one dtype
        return dynamic_conv(x, weight.to(x.dtype), params[:, -1].to(x.dtype))


class CRISHead(nn.Module):
    """CRIS neck + vision-language decoder + projector on top of ViT features.

    ``forward(levels, sentence, words, word_pad_mask)``: ``levels`` ``num_levels`` tensors
    ``[B, vis_dim[i], h, w]`` (shallow → deep, one grid), ``sentence [B, text_dim]``,
    ``words [B, L, word_dim]``, ``word_pad_mask [B, L]`` bool (True = padding) → logits
    ``[B, 1, 4h, 4w]``. ``vis_dim`` is one width for all levels or one per level.
    """

    def __init__(self, *, vis_dim: int | Sequence[int], text_dim: int, num_levels: int = 3, dim: int = 512,
                 num_layers: int = 3, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 proj_dim: int = 256, word_dim: int | None = None) -> None:
        super().__init__()
        vis_dims = [vis_dim] * num_levels if isinstance(vis_dim, int) else list(vis_dim)
        if len(vis_dims) != num_levels or dim % 4 or dim % nhead:
            raise ValueError(f"need one width per level ({num_levels}) and dim ({dim}) divisible by 4 "
                             f"and by nhead ({nhead}); got vis_dim={vis_dim}")
        self.neck = CRISNeck(vis_dims, text_dim, dim)
        self.decoder = VisionLanguageDecoder(dim, text_dim if word_dim is None else word_dim, num_layers,
                                             nhead, dim_feedforward, dropout)
        self.projector = Projector(dim, text_dim, proj_dim)

    def forward(self, levels: Sequence[Tensor], sentence: Tensor, words: Tensor, word_pad_mask: Tensor) -> Tensor:
        return self.forward_with_fused(levels, sentence, words, word_pad_mask)[0]

    def forward_with_fused(self, levels: Sequence[Tensor], sentence: Tensor, words: Tensor,
                           word_pad_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, 1, 4h, 4w], fused [B, dim, h, w])``: the decoder's vision-language features too."""
        fq = self.neck(levels, sentence)  # [B, dim, h, w]
        fq = self.decoder(fq, words, word_pad_mask)  # [B, dim, h, w]
        return self.projector(fq, sentence), fq


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
        "maskris": lambda: MaskRIS(MaskRISConfig(patch_size=maskris_patch_size(config.image_size), mask_id=0)),
    }
    unknown = [n for n in names if n not in built]
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; choose from lmvsd, vmlsd, {', '.join(built)}")
    return [built[name]() for name in names]


"""CRIS segmentation head (Wang et al., CVPR 2022) adapted to a ViT backbone.

Three parts, as in CRIS (``model/layers.py``):

* :class:`CRISNeck` -- sentence-gated fusion of several visual levels, then CoordConv.
* :class:`VisionLanguageDecoder` -- CRIS's ``TransformerDecoder``: self-attention over the
  visual tokens, cross-attention to the word features, FFN.
* :class:`Projector` -- upsampling ×4 and a per-sample dynamic 3×3 convolution whose kernel
  comes from the sentence feature.

:class:`CRISHead` chains them: ``levels, sentence, words, word_pad_mask -> logits [B,1,4h,4w]``.

Differences from CRIS (ResNet backbone), all forced or suggested by the ViT / any-batch setting:

* A ViT has a single stride, so every level already lies on the same ``h×w`` grid: the neck
  drops CRIS's bilinear up-sampling / average pooling between levels; the top-down cascade
  (deepest level gated by the sentence, then ``cat + 1×1 conv`` into each shallower level),
  the per-level 3×3 projections, ``aggr`` and the CoordConv block are kept.
* CRIS's ``txt_proj`` is ``Linear + BatchNorm1d + ReLU``; BatchNorm1d fails in training on a
  batch of one, so here it is ``Linear + ReLU`` (the gated map still goes through BN2d + ReLU).
* Word features are projected to ``dim`` by a Linear when their width differs (CRIS relies
  on the text width being equal to the decoder width).
* The levels may have different widths (``vis_dim`` per level): the reference model feeds
  intermediate ViT layers (``width``) and the final CLIP-projected tokens (``embed_dim``).
* A sample whose words are all padding makes the cross-attention softmax NaN. With CLIP
  tokens this cannot happen (SOT/EOT are never padding); it is not checked on the hot path
  because the check would cost a device sync per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = [
    "CRISHead",
    "CRISNeck",
    "CoordConv",
    "Projector",
    "VisionLanguageDecoder",
    "VisionLanguageDecoderLayer",
    "dynamic_conv",
    "pos1d",
    "pos2d",
]


def conv_bn_relu(in_dim: int, out_dim: int, kernel_size: int = 3) -> nn.Sequential:
    """CRIS ``conv_layer``: Conv2d (no bias, 'same' padding) + BatchNorm2d + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=True),
    )


def pos1d(dim: int, length: int, *, device: torch.device | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """1-D sine position encoding (CRIS ``TransformerDecoder.pos1d``). Returns ``[length, dim]``."""
    if dim % 2:
        raise ValueError(f"dim must be even for a 1-D sine encoding, got {dim}")
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                    * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe.to(dtype)


def pos2d(dim: int, height: int, width: int, *, device: torch.device | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """2-D sine position encoding (CRIS ``TransformerDecoder.pos2d``).

    The first ``dim/2`` channels encode the column (x), the last ``dim/2`` the row (y), each
    with interleaved sin/cos. Returns ``[height*width, dim]`` in row-major (h, w) token order.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sine encoding, got {dim}")
    half = dim // 2
    pe_w = pos1d(half, width, device=device)  # [w, half]
    pe_h = pos1d(half, height, device=device)  # [h, half]
    pe = torch.cat([repeat(pe_w, "w c -> h w c", h=height),
                    repeat(pe_h, "h c -> h w c", w=width)], dim=-1)
    return rearrange(pe, "h w c -> (h w) c").to(dtype)


class CoordConv(nn.Module):
    """Append normalised x/y coordinate channels in ``[-1, 1]``, then conv+BN+ReLU.

    ``[B, in_dim, h, w] -> [B, out_dim, h, w]``.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_dim + 2, out_dim, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        coord = torch.stack([repeat(xs, "w -> b h w", b=b, h=h),
                             repeat(ys, "h -> b h w", b=b, w=w)], dim=1)
        return self.conv(torch.cat([x, coord], dim=1))


def _level_dims(vis_dim: int | Sequence[int], num_levels: int) -> list[int]:
    """Channel width of every level: one int for all, or one per level."""
    if isinstance(vis_dim, int):
        return [vis_dim] * num_levels
    dims = [int(d) for d in vis_dim]
    if len(dims) != num_levels:
        raise ValueError(f"vis_dim lists {len(dims)} widths for {num_levels} levels")
    return dims


class CRISNeck(nn.Module):
    """Sentence-gated multi-level fusion (CRIS ``FPN``) for single-stride ViT features.

    Inputs: ``levels`` -- ``num_levels`` tensors ``[B, vis_dims[i], h, w]`` ordered shallow → deep
    (the last one is gated by the sentence); ``sentence`` -- ``[B, text_dim]``.
    Output: ``[B, dim, h, w]``.
    """

    def __init__(self, vis_dim: int | Sequence[int], text_dim: int, num_levels: int = 3,
                 dim: int = 512) -> None:
        super().__init__()
        self.num_levels = num_levels
        vis_dims = _level_dims(vis_dim, num_levels)
        # deepest level: 1×1 projection (CRIS f1_v_proj); the others 3×3 (f2/f3_v_proj)
        self.in_proj = nn.ModuleList(
            conv_bn_relu(vis_dims[i], dim, 1 if i == num_levels - 1 else 3)
            for i in range(num_levels))
        self.txt_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.ReLU(inplace=True))
        self.gate_norm = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        # top-down cascade: level i fused with the (already fused) level i+1 (CRIS f2/f3_cat)
        self.fuse = nn.ModuleList(conv_bn_relu(2 * dim, dim, 1) for _ in range(num_levels - 1))
        self.out_proj = nn.ModuleList(conv_bn_relu(dim, dim, 3) for _ in range(num_levels))
        self.aggr = conv_bn_relu(num_levels * dim, dim, 1)
        self.coordconv = nn.Sequential(CoordConv(dim, dim, 3), conv_bn_relu(dim, dim, 3))

    def forward(self, levels: Sequence[Tensor], sentence: Tensor) -> Tensor:
        txt = rearrange(self.txt_proj(sentence), "b c -> b c 1 1")
        fused: list[Tensor] = [None] * self.num_levels  # type: ignore[list-item]
        deepest = self.num_levels - 1
        fused[deepest] = self.gate_norm(self.in_proj[deepest](levels[deepest]) * txt)
        for i in range(deepest - 1, -1, -1):
            fused[i] = self.fuse[i](torch.cat([self.in_proj[i](levels[i]), fused[i + 1]], dim=1))
        out = torch.cat([proj(f) for proj, f in zip(self.out_proj, fused)], dim=1)
        return self.coordconv(self.aggr(out))


class VisionLanguageDecoderLayer(nn.Module):
    """One CRIS ``TransformerDecoderLayer`` on token sequences (batch first).

    Pre-norm residual blocks exactly as CRIS: ``x + drop(norm_out(attn(norm_in(x))))`` for the
    self- and cross-attention (CRIS's extra ``self_attn_norm`` / ``cross_attn_norm`` on the
    attention output), and ``x + drop(ffn(norm(x)))`` with CRIS's FFN
    ``Linear → ReLU → Dropout → LayerNorm(dim_ffn) → Linear``.

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

    def forward(self, vis: Tensor, txt: Tensor, vis_pos: Tensor, txt_pos: Tensor,
                pad_mask: Tensor) -> Tensor:
        x = self.norm1(vis)
        q = x + vis_pos
        x = self.self_attn(q, q, x, need_weights=False)[0]
        vis = vis + self.dropout1(self.self_attn_norm(x))
        x = self.norm2(vis)
        x = self.cross_attn(x + vis_pos, txt + txt_pos, txt,
                            key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(x))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class VisionLanguageDecoder(nn.Module):
    """CRIS ``TransformerDecoder``: visual tokens attend to themselves and to the words.

    ``vis [B, dim, h, w]``, ``words [B, L, word_dim]``, ``word_pad_mask [B, L]`` bool
    (True = padding) → ``[B, dim, h, w]``. Words are projected to ``dim`` if
    ``word_dim != dim``; a final LayerNorm is applied to the output tokens.
    """

    def __init__(self, dim: int = 512, word_dim: int = 512, num_layers: int = 3, nhead: int = 8,
                 dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.word_proj: nn.Module = nn.Identity() if word_dim == dim else nn.Linear(word_dim, dim)
        self.layers = nn.ModuleList(
            VisionLanguageDecoderLayer(dim, nhead, dim_feedforward, dropout)
            for _ in range(num_layers))
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
    """Per-sample convolution to one output channel, as one grouped conv (no Python loop).

    ``x [B, C, H, W]``, ``weight [B, C, k, k]`` (k odd), ``bias [B]`` → ``[B, 1, H, W]``;
    sample ``b`` is convolved with its own kernel ``weight[b]`` and bias ``bias[b]``.
    """
    b = x.shape[0]
    k = weight.shape[-1]
    out = F.conv2d(rearrange(x, "b c h w -> 1 (b c) h w"), weight, bias=bias,
                   padding=k // 2, groups=b)
    return rearrange(out, "1 b h w -> b 1 h w")


class Projector(nn.Module):
    """CRIS ``Projector``: upsample ×4 and a text-conditioned dynamic 3×3 convolution.

    ``x [B, dim, h, w]``, ``sentence [B, text_dim]`` → logits ``[B, 1, 4h, 4w]``.
    """

    def __init__(self, dim: int = 512, text_dim: int = 512, proj_dim: int = 256,
                 kernel_size: int = 3) -> None:
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
        weight = rearrange(params[:, :-1], "b (c kh kw) -> b c kh kw",
                           c=self.proj_dim, kh=self.kernel_size)
        # under autocast the conv runs in the low dtype; keep x and kernel in one dtype
        return dynamic_conv(x, weight.to(x.dtype), params[:, -1].to(x.dtype))


class CRISHead(nn.Module):
    """CRIS neck + vision-language decoder + projector on top of ViT features.

    ``forward(levels, sentence, words, word_pad_mask)``:

    * ``levels``: ``num_levels`` tensors ``[B, vis_dim[i], h, w]`` (shallow → deep, same grid;
      ``vis_dim`` is one width for all levels or one per level),
    * ``sentence``: ``[B, text_dim]`` global text feature,
    * ``words``: ``[B, L, word_dim]`` per-token text features (``word_dim`` defaults to
      ``text_dim``),
    * ``word_pad_mask``: ``[B, L]`` bool, True at padding tokens,

    returns mask logits ``[B, 1, 4h, 4w]`` (1/4 of the image for a patch-16 ViT).
    """

    def __init__(self, *, vis_dim: int | Sequence[int], text_dim: int, num_levels: int = 3, dim: int = 512,
                 num_layers: int = 3, nhead: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, proj_dim: int = 256, word_dim: int | None = None) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if dim % 4 or dim % nhead:
            raise ValueError(f"dim must be divisible by 4 and by nhead={nhead}, got {dim}")
        self.vis_dims = _level_dims(vis_dim, num_levels)
        self.text_dim = text_dim
        self.word_dim = text_dim if word_dim is None else word_dim
        self.num_levels = num_levels
        self.neck = CRISNeck(vis_dim, text_dim, num_levels, dim)
        self.decoder = VisionLanguageDecoder(dim, self.word_dim, num_layers, nhead,
                                             dim_feedforward, dropout)
        self.projector = Projector(dim, text_dim, proj_dim)

    def _validate(self, levels: Sequence[Tensor], sentence: Tensor, words: Tensor,
                  word_pad_mask: Tensor) -> None:
        if not isinstance(levels, (list, tuple)) or len(levels) != self.num_levels:
            n = len(levels) if isinstance(levels, (list, tuple)) else type(levels).__name__
            raise ValueError(f"levels must be a list of {self.num_levels} tensors, got {n}")
        ref = levels[0].shape if isinstance(levels[0], Tensor) else None
        for i, lvl in enumerate(levels):
            if not isinstance(lvl, Tensor) or lvl.ndim != 4 or lvl.shape[1] != self.vis_dims[i]:
                got = tuple(lvl.shape) if isinstance(lvl, Tensor) else type(lvl).__name__
                raise ValueError(f"levels[{i}] must be [B, {self.vis_dims[i]}, h, w], got {got}")
            if (lvl.shape[0], *lvl.shape[2:]) != (ref[0], *ref[2:]):
                raise ValueError(f"levels[{i}] has shape {tuple(lvl.shape)}, but levels[0] has "
                                 f"{tuple(ref)}; all levels must share batch and grid")
        b = ref[0]
        if not isinstance(sentence, Tensor) or tuple(sentence.shape) != (b, self.text_dim):
            got = tuple(sentence.shape) if isinstance(sentence, Tensor) else type(sentence)
            raise ValueError(f"sentence must be [{b}, {self.text_dim}], got {got}")
        if (not isinstance(words, Tensor) or words.ndim != 3 or words.shape[0] != b
                or words.shape[2] != self.word_dim or words.shape[1] == 0):
            got = tuple(words.shape) if isinstance(words, Tensor) else type(words)
            raise ValueError(f"words must be [{b}, L>0, {self.word_dim}], got {got}")
        length = words.shape[1]
        if not isinstance(word_pad_mask, Tensor) or tuple(word_pad_mask.shape) != (b, length):
            got = tuple(word_pad_mask.shape) if isinstance(word_pad_mask, Tensor) else type(
                word_pad_mask)
            raise ValueError(f"word_pad_mask must be [{b}, {length}], got {got}")
        if word_pad_mask.dtype != torch.bool:
            raise ValueError(f"word_pad_mask must be torch.bool (True = padding), "
                             f"got {word_pad_mask.dtype}")

    def forward(self, levels: Sequence[Tensor], sentence: Tensor, words: Tensor,
                word_pad_mask: Tensor) -> Tensor:
        self._validate(levels, sentence, words, word_pad_mask)
        fq = self.neck(levels, sentence)  # [B, dim, h, w]
        fq = self.decoder(fq, words, word_pad_mask)  # [B, dim, h, w]
        return self.projector(fq, sentence)  # [B, 1, 4h, 4w]

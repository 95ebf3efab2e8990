"""The CRIS head (Wang et al., CVPR 2022, ``model/layers.py``) on ViT levels, for ``model.py``.

:class:`CRISNeck` (sentence-gated fusion of the ViT levels, CoordConv) → :class:`VisionLanguageDecoder`
(self-attention over the visual tokens, cross-attention to the words) → :class:`Projector`
(upsampling ×4, a per-sample 3×3 convolution whose kernel comes from the sentence), assembled by
:class:`CRISHead`. Differences from CRIS's ResNet version are listed in ``model.py``'s docstring.
This module imports no sibling module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


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
    """Append x/y coordinate channels in ``[-1, 1]``, then conv+BN+ReLU:
    ``[B, C, h, w] -> [B, out, h, w]``."""

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

    def __init__(
        self, dim: int = 512, text_dim: int = 512, proj_dim: int = 256, kernel_size: int = 3
    ) -> None:
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

    def forward(
        self, levels: Sequence[Tensor], sentence: Tensor, words: Tensor, word_pad_mask: Tensor
    ) -> Tensor:
        return self.forward_with_fused(levels, sentence, words, word_pad_mask)[0]

    def forward_with_fused(self, levels: Sequence[Tensor], sentence: Tensor, words: Tensor,
                           word_pad_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, 1, 4h, 4w], fused [B, dim, h, w])``: the decoder's vision-language features too."""
        fq = self.neck(levels, sentence)  # [B, dim, h, w]
        fq = self.decoder(fq, words, word_pad_mask)  # [B, dim, h, w]
        return self.projector(fq, sentence), fq

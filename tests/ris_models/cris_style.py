"""A tiny late-fusion RIS model written the way CRIS (DerrickWang005/CRIS.pytorch) writes its own.

``CRIS(img, word, mask=None)``; shapes for the default 64 px input, ``L`` = 8 tokens:

* ``backbone``: ``open_clip.CLIP`` with a ``ModifiedResNet`` vision tower. Like CRIS, the model
  drives its public submodules itself (``backbone.visual``, ``encode_image``/``encode_text`` are
  never called). Image: stem ``visual.conv1/bn1/act1, conv2/bn2/act2, conv3/bn3/act3`` (ReLUs
  ``inplace=True``) -> ``visual.avgpool`` = image embedding, bchw ``[B, 16, H/4, W/4]`` ->
  ``layer1``; C3 = ``layer2`` ``[B, 128, H/8, W/8]``, C4 = ``layer3`` ``[B, 256, H/16, W/16]``,
  C5 = spatial attention pool of ``layer4`` (``[B, 512, H/32, W/32]``) -> ``[B, 32, H/32, W/32]``
  via ``F.multi_head_attention_forward`` with ``visual.attnpool``'s parameters (so ``attnpool``
  and its ``c_proj`` never run as modules) plus a residual ``attnpool.connect`` (Conv+BN, added
  here as CRIS does). Text: ``backbone.token_embedding`` ``[B, L, 32]`` + ``positional_embedding``
  -> ``backbone.transformer`` (causal) -> ``backbone.ln_final`` = words ``[B, L, 32]``; sentence
  ``state`` = EOT row (argmax of ids) ``@ backbone.text_projection`` ``[B, 32]``.
* ``neck`` (``FPN``): ``neck((v3, v4, v5), state)`` -> ``[B, 32, H/16, W/16]``: C5 gated by
  ``state``, top-down fusion, CoordConv; BatchNorm + ``ReLU(inplace=True)`` throughout.
* ``decoder``: visual self-attention + cross-attention to words (``key_padding_mask = word == 0``,
  dropout 0.1) -> ``[B, 32, HW]``.
* ``proj`` (``Projector``): upsample x4 + dynamic 3x3 conv with a kernel from ``state`` -> logits
  ``[B, 1, H/4, W/4]`` (not detached: hook here for logits).

Returns: train ``(pred.detach(), mask_resized, loss)`` (BCE-with-logits inside; ``mask`` required);
eval ``pred.detach()``. Late fusion: image features never depend on the text, nor text on image.

No gradient after a training step: ``backbone.logit_scale`` only (CLIP's contrastive temperature is
unused by segmentation; CRIS trains with DDP ``find_unused_parameters=True``). open_clip
zero-initialises each bottleneck's ``bn3.weight``, so at random init the convs inside the residual
branches get gradients that are exact zeros (present, but zero).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PAD, SOT, EOT = 0, 98, 99
VOCAB_SIZE = 100


def conv_layer(in_dim: int, out_dim: int, kernel_size: int = 1, stride: int = 1) -> nn.Sequential:
    """Conv2d + BatchNorm2d + ReLU(inplace) (``[B, in, H, W] -> [B, out, H/stride, W/stride]``)."""
    conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


def linear_layer(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear + BatchNorm1d + ReLU(inplace) (``[B, in] -> [B, out]``)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim),
                         nn.ReLU(inplace=True))


class CoordConv(nn.Module):
    """Append normalised x/y coordinate channels, then ``conv_layer`` (``[B, C, H, W] -> [B, out, H, W]``)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = conv_layer(in_dim + 2, out_dim, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xx, yy]).to(x).expand(b, -1, -1, -1)
        return self.conv(torch.cat([x, coords], dim=1))


class FPN(nn.Module):
    """Sentence-gated FPN over (C3, C4, C5); output on the C4 grid ``[B, dim, H/16, W/16]``."""

    def __init__(
        self, in_dims: tuple[int, int, int] = (128, 256, 32), state_dim: int = 32, dim: int = 32
    ) -> None:
        super().__init__()
        self.txt_proj = linear_layer(state_dim, dim)
        self.f5_proj = conv_layer(in_dims[2], dim, 1)
        self.f5_norm = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.f4_proj = conv_layer(in_dims[1], dim, 3)
        self.f4_cat = conv_layer(2 * dim, dim, 1)
        self.f3_proj = conv_layer(in_dims[0], dim, 3)
        self.f3_cat = conv_layer(2 * dim, dim, 1)
        self.f3_down = conv_layer(dim, dim, 3, stride=2)
        self.aggr = conv_layer(3 * dim, dim, 1)
        self.coordconv = nn.Sequential(CoordConv(dim, dim, 3), conv_layer(dim, dim, 3))

    def forward(self, feats: tuple[Tensor, Tensor, Tensor], state: Tensor) -> Tensor:
        """``feats`` = (v3 ``[B,C3,H/8,W/8]``, v4 ``[B,C4,H/16,W/16]``, v5 ``[B,C5,H/32,W/32]``),
        ``state`` ``[B,S]``."""
        v3, v4, v5 = feats
        gate = self.txt_proj(state)[:, :, None, None]
        f5 = self.f5_norm(self.f5_proj(v5) * gate)
        f5_up = F.interpolate(f5, size=v4.shape[-2:], mode="bilinear", align_corners=False)
        f4 = self.f4_cat(torch.cat([self.f4_proj(v4), f5_up], dim=1))
        f4_up = F.interpolate(f4, size=v3.shape[-2:], mode="bilinear", align_corners=False)
        f3 = self.f3_cat(torch.cat([self.f3_proj(v3), f4_up], dim=1))
        fq = self.aggr(torch.cat([self.f3_down(f3), f4, f5_up], dim=1))
        return self.coordconv(fq)


def pos_1d(length: int, dim: int) -> Tensor:
    """Fixed sine positional encoding ``[length, 1, dim]`` (sequence-first)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.stack([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)  # [length, dim/2, 2]
    return rearrange(pe, "n d two -> n 1 (d two)")


def pos_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2-D sine positional encoding ``[h*w, 1, dim]``: half the channels for y, half for x."""
    pe_y = pos_1d(h, dim // 2)[:, None, 0].expand(h, w, dim // 2)
    pe_x = pos_1d(w, dim // 2)[None, :, 0].expand(h, w, dim // 2)
    return rearrange(torch.cat([pe_y, pe_x], dim=-1), "h w c -> (h w) 1 c")


class DecoderLayer(nn.Module):
    """Pre-norm layer: visual self-attention, cross-attention to words, FFN (sequence-first)."""

    def __init__(self, d_model: int, nhead: int, word_dim: int, dim_ff: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, kdim=word_dim, vdim=word_dim)
        self.norm3 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim_ff, d_model)
        )
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, vis: Tensor, txt: Tensor, vis_pos: Tensor, txt_pos: Tensor, pad_mask: Tensor) -> Tensor:
        """``vis`` ``[HW, B, C]``, ``txt`` ``[L, B, D]``, ``pad_mask`` ``[B, L]`` (True = pad) ->
        ``[HW, B, C]``."""
        v = self.norm1(vis)
        q = v + vis_pos
        vis = vis + self.dropout1(self.self_attn(q, q, value=v, need_weights=False)[0])
        q = self.norm2(vis) + vis_pos
        attn = self.cross_attn(q, txt + txt_pos, value=txt, key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.dropout2(attn)
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class TransformerDecoder(nn.Module):
    """Stack of ``DecoderLayer``; ``[B, C, H, W]`` visual + ``[B, L, D]`` words -> ``[B, C, HW]``."""

    def __init__(
        self, num_layers: int = 1, d_model: int = 32, nhead: int = 2, word_dim: int = 32, dim_ff: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, word_dim, dim_ff, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis: Tensor, txt: Tensor, pad_mask: Tensor) -> Tensor:
        b, c, h, w = vis.shape
        vis_pos = pos_2d(h, w, c).to(vis)
        txt_pos = pos_1d(txt.shape[1], txt.shape[2]).to(txt)
        vis = rearrange(vis, "b c h w -> (h w) b c")
        txt = rearrange(txt, "b l d -> l b d")
        for layer in self.layers:
            vis = layer(vis, txt, vis_pos, txt_pos, pad_mask)
        return rearrange(self.norm(vis), "n b c -> b c n")


class Projector(nn.Module):
    """Upsample x4 + dynamic conv with a kernel predicted from the sentence -> ``[B, 1, 4h, 4w]``."""

    def __init__(self, state_dim: int = 32, in_dim: int = 32, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        out_dim = in_dim // 2
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_layer(in_dim, in_dim, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_layer(in_dim, out_dim, 3),
            nn.Conv2d(out_dim, out_dim, 1),
        )
        self.txt = nn.Linear(state_dim, out_dim * kernel_size * kernel_size + 1)

    def forward(self, x: Tensor, state: Tensor) -> Tensor:
        """``x`` ``[B, C, h, w]``, ``state`` ``[B, S]`` -> logits ``[B, 1, 4h, 4w]``."""
        x = self.vis(x)
        b, c, h, w = x.shape
        params = self.txt(state)
        weight = params[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)
        bias = params[:, -1]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias=bias, padding=self.kernel_size // 2, groups=b)
        return out.transpose(0, 1)


def build_clip(
    image_size: int = 64, context_length: int = 8, embed_dim: int = 32, width: int = 16
) -> open_clip.CLIP:
    """A random-init ``open_clip.CLIP`` with a ``ModifiedResNet`` (RN) vision tower."""
    return open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg=dict(image_size=image_size, layers=(1, 1, 1, 1), width=width, head_width=64),
        text_cfg=dict(context_length=context_length, vocab_size=VOCAB_SIZE, width=32, heads=2, layers=1),
    )


class CRIS(nn.Module):
    """CRIS-style late-fusion RIS model (see module docstring for shapes and hook sites)."""

    def __init__(self, image_size: int = 64, context_length: int = 8, dim: int = 32) -> None:
        super().__init__()
        self.backbone = build_clip(image_size, context_length)
        visual = self.backbone.visual
        c5_in, state_dim = visual.attnpool.k_proj.in_features, visual.output_dim
        # CRIS adds a residual branch to CLIP's attention pool (not in the CLIP checkpoint).
        visual.attnpool.connect = nn.Sequential(nn.Conv2d(c5_in, state_dim, 1, bias=False),
                                                nn.BatchNorm2d(state_dim))
        c3, c4 = c5_in // 4, c5_in // 2
        word_dim = self.backbone.ln_final.normalized_shape[0]
        self.neck = FPN((c3, c4, state_dim), state_dim, dim)
        self.decoder = TransformerDecoder(1, dim, 2, word_dim, 2 * dim, 0.1)
        self.proj = Projector(state_dim, dim, 3)

    def encode_image(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, 3, H, W]`` -> (v3 ``[B,128,H/8,W/8]``, v4 ``[B,256,H/16,W/16]``, v5 ``[B,32,H/32,W/32]``)."""
        v = self.backbone.visual
        x = v.act1(v.bn1(v.conv1(img)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.act3(v.bn3(v.conv3(x)))
        x = v.avgpool(x)
        x = v.layer1(x)
        v3 = v.layer2(x)
        v4 = v.layer3(v3)
        v5 = self.spatial_attnpool(v.layer4(v4))
        return v3, v4, v5

    def spatial_attnpool(self, x: Tensor) -> Tensor:
        """CLIP attention pool kept spatial (no mean-token query): ``[B, C, h, w] -> [B, out, h, w]``."""
        pool = self.backbone.visual.attnpool
        b, c, h, w = x.shape
        res = pool.connect(x)
        pos = pool.positional_embedding[1:]
        side = math.isqrt(pos.shape[0])
        if (h, w) != (side, side):
            grid = rearrange(pos, "(h w) c -> 1 c h w", h=side)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = rearrange(grid, "1 c h w -> (h w) c")
        tokens = rearrange(x, "b c h w -> (h w) b c") + pos[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=tokens, key=tokens, value=tokens, embed_dim_to_check=c, num_heads=pool.num_heads,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias, training=self.training,
            need_weights=False, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        )
        out = rearrange(out, "(h w) b c -> b c h w", h=h, w=w)
        return F.relu(out + res)

    def encode_text(self, word: Tensor) -> tuple[Tensor, Tensor]:
        """``word`` ids ``[B, L]`` -> (word features ``[B, L, 32]``, sentence state ``[B, 32]``)."""
        bb = self.backbone
        length = word.shape[1]
        x = bb.token_embedding(word)
        x = x + bb.positional_embedding[:length]
        x = bb.transformer(x, attn_mask=bb.attn_mask[:length, :length])
        x = bb.ln_final(x)
        state = x[torch.arange(x.shape[0], device=x.device), word.argmax(dim=-1)] @ bb.text_projection
        return x, state

    def forward(
        self, img: Tensor, word: Tensor, mask: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """``img`` ``[B,3,H,W]``, ``word`` ``[B,L]`` (pad 0), ``mask`` ``[B,1,H,W]`` float (train only).

        Train: ``(pred.detach() [B,1,H/4,W/4], mask [B,1,H/4,W/4], loss [])``; eval: ``pred.detach()``.
        """
        pad_mask = torch.zeros_like(word).masked_fill_(word == PAD, 1).bool()
        vis = self.encode_image(img)
        words, state = self.encode_text(word)
        fq = self.neck(vis, state)
        b, c, h, w = fq.shape
        fq = self.decoder(fq, words, pad_mask).reshape(b, c, h, w)
        pred = self.proj(fq, state)
        if self.training:
            if pred.shape[-2:] != mask.shape[-2:]:
                mask = F.interpolate(mask, pred.shape[-2:], mode="nearest").detach()
            loss = F.binary_cross_entropy_with_logits(pred, mask)
            return pred.detach(), mask, loss
        return pred.detach()


class CRISBatch(NamedTuple):
    """One training batch, in the order CRIS's train loop passes it: ``model(img, word, mask)``."""

    img: Tensor  # [B, 3, H, W] float
    word: Tensor  # [B, L] long: SOT w... EOT 0...
    mask: Tensor  # [B, 1, H, W] float in {0, 1}


def make_batch(
    batch_size: int = 4, image_size: int = 64, context_length: int = 8, seed: int = 0
) -> CRISBatch:
    """Random images, CLIP-style ids (SOT=98 ... EOT=99, pad 0; lengths vary) and box masks."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    word = torch.full((batch_size, context_length), PAD, dtype=torch.long)
    mask = torch.zeros(batch_size, 1, image_size, image_size)
    for i in range(batch_size):
        n = context_length - 2 if i == 0 else int(torch.randint(1, context_length - 1, (1,), generator=gen))
        word[i, 0], word[i, n + 1] = SOT, EOT
        word[i, 1 : n + 1] = torch.randint(1, SOT, (n,), generator=gen)
        y0, x0 = torch.randint(0, image_size // 2, (2,), generator=gen).tolist()
        bh, bw = torch.randint(image_size // 4, image_size // 2 + 1, (2,), generator=gen).tolist()
        mask[i, 0, y0 : y0 + bh, x0 : x0 + bw] = 1.0
    return CRISBatch(img, word, mask)

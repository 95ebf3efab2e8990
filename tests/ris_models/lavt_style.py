"""A tiny early-fusion RIS model written the way LAVT (yz93/LAVT-RIS, ``lavt_one``) writes its own.

``LAVTOne(image, input_ids, attention_mask)``:

* ``text_encoder``: a Hugging Face ``transformers.BertModel`` (tiny ``BertConfig``, no pooler),
  called as a module: ``l_feats = text_encoder(input_ids, attention_mask=attention_mask)[0]``
  ``[B, L, 32]``. Word-embedding site: ``text_encoder.embeddings.word_embeddings`` ``[B, L, 32]``
  (token-type and position embeddings, LayerNorm and dropout are applied after it, out of place).
* ``backbone`` (``MultiModalSwin``): ``backbone.patch_embed`` = Conv2d 4x4/4 -> flatten -> LayerNorm
  -> back to bchw; its **output is bchw** ``[B, 16, H/4, W/4]`` and the backbone flattens it right
  after (as Swin's ``PatchEmbed``). Then 3 stages ``backbone.layers[i]`` (dims 16/32/64, global
  attention blocks with drop-path 0.1, ``PWAM`` fusion + tanh ``res_gate``, patch merging between
  stages). Stage ``i`` returns its fused output; ``backbone.norm{i}`` (LayerNorm) normalises it and
  it is reshaped to ``[B, C_i, H_i, W_i]``. Every stage after the first sees the text through the
  previous PWAM, so **image features depend on the text** (text -> image fusion only).
  Pixel-word space: ``backbone.layers[i].fusion.image_lang_att.f_query`` (pixels, ``[B, C, N]``)
  and ``.f_key`` (words, ``[B, C, L]``).
* ``classifier`` (``SimpleDecoding``): conv + BatchNorm + ReLU top-down decoder -> ``[B, 2, H/4, W/4]``,
  then ``F.interpolate`` (bilinear) to the input size inside ``forward``.

Returns two-class logits ``[B, 2, H, W]`` in train *and* eval; the loss is computed outside
(``lavt_loss``: weighted cross-entropy, as LAVT's train loop). Every parameter gets a gradient in a
training step (the pad row of ``word_embeddings`` gets a zero one: ``padding_idx=0``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import Tensor, nn
from transformers import BertConfig, BertModel

PAD, CLS, SEP, MASK = 0, 2, 3, 4
VOCAB_SIZE = 100


class PatchEmbed(nn.Module):
    """Swin patch embedding: ``[B, 3, H, W] -> [B, C, H/4, W/4]`` (LayerNorm over channels)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        h, w = x.shape[-2:]
        x = self.norm(rearrange(x, "b c h w -> b (h w) c"))
        return rearrange(x, "b (h w) c -> b c h w", h=h, w=w)


class Attention(nn.Module):
    """Global multi-head self-attention over tokens ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SpatialImageLanguageAttention(nn.Module):
    """Pixels attend to words: ``x [B, N, C]``, ``l_feats [B, Cl, L]``, ``l_mask [B, L, 1]`` ->
    ``[B, N, C]``."""

    def __init__(self, v_in: int, l_in: int, key_dim: int, value_dim: int, num_heads: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.f_query = nn.Sequential(nn.Conv1d(v_in, key_dim, 1), nn.InstanceNorm1d(key_dim))
        self.f_key = nn.Conv1d(l_in, key_dim, 1)
        self.f_value = nn.Conv1d(l_in, value_dim, 1)
        self.W = nn.Sequential(nn.Conv1d(value_dim, value_dim, 1), nn.InstanceNorm1d(value_dim))

    def forward(self, x: Tensor, l_feats: Tensor, l_mask: Tensor) -> Tensor:
        l_mask = rearrange(l_mask, "b l 1 -> b 1 l")
        query = rearrange(self.f_query(rearrange(x, "b n c -> b c n")), "b (h d) n -> b h n d",
                          h=self.num_heads)
        key = rearrange(self.f_key(l_feats) * l_mask, "b (h d) l -> b h d l", h=self.num_heads)
        value = rearrange(self.f_value(l_feats) * l_mask, "b (h d) l -> b h l d", h=self.num_heads)
        sim = (query @ key) * key.shape[2] ** -0.5
        sim = sim + (1e4 * l_mask[:, None] - 1e4)  # [B, h, N, L]; pads -> -1e4
        out = rearrange(sim.softmax(dim=-1) @ value, "b h n d -> b (h d) n")
        return rearrange(self.W(out), "b c n -> b n c")


class PWAM(nn.Module):
    """Pixel-word attention module: element-wise product of pixel and attended-language features."""

    def __init__(self, dim: int, l_dim: int, num_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(dim, l_dim, dim, dim, num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: Tensor, l_feats: Tensor, l_mask: Tensor) -> Tensor:
        """``x [B, N, C]``, ``l_feats [B, Cl, L]``, ``l_mask [B, L, 1]`` -> ``[B, N, C]``."""
        vis = self.vis_project(rearrange(x, "b n c -> b c n"))
        lang = rearrange(self.image_lang_att(x, l_feats, l_mask), "b n c -> b c n")
        return rearrange(self.project_mm(vis * lang), "b c n -> b n c")


class PatchMerging(nn.Module):
    """Concatenate 2x2 neighbours and project: ``[B, H*W, C] -> [B, H/2*W/2, 2C]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = rearrange(x, "b (h p1 w p2) c -> b (h w) (p1 p2 c)", h=h // 2, p1=2, w=w // 2, p2=2)
        return self.reduction(self.norm(x))


class MMStage(nn.Module):
    """Blocks, then gated language fusion; returns (fused ``[B,N,C]``, H, W, next ``[B,N',C']``, H', W')."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, l_dim: int, drop_path: list[float], downsample: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, drop_path[i]) for i in range(depth))
        self.fusion = PWAM(dim, l_dim, num_heads=1, dropout=0.0)
        self.res_gate = nn.Sequential(
            nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh()
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, x: Tensor, h: int, w: int, l_feats: Tensor, l_mask: Tensor
    ) -> tuple[Tensor, int, int, Tensor, int, int]:
        for blk in self.blocks:
            x = blk(x)
        x_residual = self.fusion(x, l_feats, l_mask)
        x = x + self.res_gate(x_residual) * x_residual
        if self.downsample is None:
            return x, h, w, x, h, w
        return x, h, w, self.downsample(x, h, w), h // 2, w // 2


class MultiModalSwin(nn.Module):
    """Hierarchical backbone with PWAM in every stage: image + words -> 3 maps
    ``[B, C_i, H/2^(i+2), ...]``."""

    def __init__(
        self, embed_dim: int = 16, depths: tuple[int, ...] = (1, 2, 1),
        num_heads: tuple[int, ...] = (1, 2, 4), l_dim: int = 32, drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(4, 3, embed_dim)
        self.pos_drop = nn.Dropout(0.0)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        for i, depth in enumerate(depths):
            dp = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            stage = MMStage(self.num_features[i], depth, num_heads[i], l_dim, dp, i < len(depths) - 1)
            self.layers.append(stage)
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x: Tensor, l_feats: Tensor, l_mask: Tensor) -> list[Tensor]:
        """``x [B,3,H,W]``, ``l_feats [B,Cl,L]``, ``l_mask [B,L,1]`` ->
        ``[B,16,H/4,W/4], [B,32,H/8,W/8], [B,64,H/16,W/16]``."""
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = self.pos_drop(rearrange(x, "b c h w -> b (h w) c"))
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, ho, wo, x, h, w = layer(x, h, w, l_feats, l_mask)
            x_out = getattr(self, f"norm{i}")(x_out)
            outs.append(rearrange(x_out, "b (h w) c -> b c h w", h=ho, w=wo))
        return outs


def conv_bn_relu(in_dim: int, out_dim: int) -> list[nn.Module]:
    """3x3 Conv2d + BatchNorm2d + ReLU as a list of layers."""
    return [nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU()]


class SimpleDecoding(nn.Module):
    """Top-down decoder: ``[c1, c2, c3]`` (fine -> coarse) -> two-class logits on the c1 grid
    ``[B, 2, h1, w1]``."""

    def __init__(self, dims: tuple[int, int, int] = (16, 32, 64), hidden: int = 32) -> None:
        super().__init__()
        self.fuse2 = nn.Sequential(*conv_bn_relu(dims[2] + dims[1], hidden), *conv_bn_relu(hidden, hidden))
        self.fuse1 = nn.Sequential(*conv_bn_relu(hidden + dims[0], hidden), *conv_bn_relu(hidden, hidden))
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        c1, c2, c3 = feats
        x = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True)
        x = self.fuse2(torch.cat([x, c2], dim=1))
        x = F.interpolate(x, size=c1.shape[-2:], mode="bilinear", align_corners=True)
        x = self.fuse1(torch.cat([x, c1], dim=1))
        return self.conv1_1(x)


def tiny_bert_config(max_positions: int = 32) -> BertConfig:
    """hidden 32, 1 layer, 2 heads, intermediate 64, vocab 100, dropout 0.1."""
    return BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_positions, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, pad_token_id=PAD,
    )


class LAVTOne(nn.Module):
    """LAVT-One-style model (see module docstring for shapes and hook sites)."""

    def __init__(self, embed_dim: int = 16, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.text_encoder = BertModel(tiny_bert_config(), add_pooling_layer=False)
        l_dim = self.text_encoder.config.hidden_size
        self.backbone = MultiModalSwin(embed_dim, (1, 2, 1), (1, 2, 4), l_dim, drop_path_rate)
        self.classifier = SimpleDecoding(tuple(self.backbone.num_features), 32)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``image [B,3,H,W]``, ``input_ids``/``attention_mask`` ``[B,L]`` -> logits ``[B, 2, H, W]``."""
        input_shape = image.shape[-2:]
        l_feats = self.text_encoder(input_ids, attention_mask=attention_mask)[0]  # [B, L, Cl]
        l_feats = l_feats.permute(0, 2, 1)  # [B, Cl, L]
        l_mask = attention_mask.unsqueeze(dim=-1).to(l_feats.dtype)  # [B, L, 1]
        features = self.backbone(image, l_feats, l_mask)
        x = self.classifier(features)
        return F.interpolate(x, size=input_shape, mode="bilinear", align_corners=True)


class LAVT(nn.Module):
    """LAVT's default (``lavt``): the segmentation model without BERT. Its train loop runs a separate,
    separately DDP-wrapped ``BertModel`` first: ``embedding = bert(ids, attention_mask=mask)[0]
    .permute(0, 2, 1)``; ``model(image, embedding, l_mask=mask.unsqueeze(-1))``."""

    def __init__(self, embed_dim: int = 16, drop_path_rate: float = 0.1, l_dim: int = 32) -> None:
        super().__init__()
        self.backbone = MultiModalSwin(embed_dim, (1, 2, 1), (1, 2, 4), l_dim, drop_path_rate)
        self.classifier = SimpleDecoding(tuple(self.backbone.num_features), 32)

    def forward(self, x: Tensor, l_feats: Tensor, l_mask: Tensor) -> Tensor:
        """``x [B,3,H,W]``, ``l_feats [B, Cl, L]``, ``l_mask [B, L, 1]`` -> logits ``[B, 2, H, W]``."""
        input_shape = x.shape[-2:]
        features = self.backbone(x, l_feats, l_mask.to(l_feats.dtype))
        return F.interpolate(self.classifier(features), size=input_shape, mode="bilinear", align_corners=True)


def tiny_bert() -> BertModel:
    return BertModel(tiny_bert_config(), add_pooling_layer=False)


def lavt_loss(logits: Tensor, target: Tensor) -> Tensor:
    """LAVT's loss: cross-entropy with class weights [0.9, 1.1]; ``logits [B,2,H,W]``,
    ``target [B,H,W]`` long."""
    weight = torch.tensor([0.9, 1.1], device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target, weight=weight)


class LAVTBatch(NamedTuple):
    """One batch as LAVT's train loop has it:
    ``loss = lavt_loss(model(image, input_ids, attention_mask), target)``."""

    image: Tensor  # [B, 3, H, W] float
    input_ids: Tensor  # [B, L] long: CLS w... SEP PAD...
    attention_mask: Tensor  # [B, L] long, 1 on real tokens (CLS/SEP included)
    target: Tensor  # [B, H, W] long in {0, 1}


def make_batch(batch_size: int = 4, image_size: int = 64, max_tokens: int = 10, seed: int = 0) -> LAVTBatch:
    """Random images, BERT-style ids of varying length ([CLS]=2, [SEP]=3, [PAD]=0) and box targets."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    input_ids = torch.full((batch_size, max_tokens), PAD, dtype=torch.long)
    for i in range(batch_size):
        n = max_tokens - 2 if i == 0 else int(torch.randint(1, max_tokens - 1, (1,), generator=gen))
        input_ids[i, 0] = CLS
        input_ids[i, 1 : n + 1] = torch.randint(MASK + 1, VOCAB_SIZE, (n,), generator=gen)
        input_ids[i, n + 1] = SEP
    attention_mask = (input_ids != PAD).long()
    target = torch.zeros(batch_size, image_size, image_size, dtype=torch.long)
    for i in range(batch_size):
        y0, x0 = torch.randint(0, image_size // 2, (2,), generator=gen).tolist()
        bh, bw = torch.randint(image_size // 4, image_size // 2 + 1, (2,), generator=gen).tolist()
        target[i, y0 : y0 + bh, x0 : x0 + bw] = 1
    return LAVTBatch(image, input_ids, attention_mask, target)

"""Tiny random-init ``transformers.CLIPModel`` (no download), its inputs, the dense scoring
features written out from its weights, and ``HFClipRIS``, an RIS model built on a ``CLIPModel``
the way a codebase writes one (its own forward, no masksd types) with its ``HookSpec``: shared by
the HF CLIP tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from masksd import HookSpec, Maskable, ModalitySpec, Tap

transformers = pytest.importorskip("transformers")

BOS, EOS = 49406, 49407
WIDTH, DIM, LENGTH = 32, 24, 12


def tiny_clip(seed: int = 0, vision: dict | None = None, **text_overrides) -> nn.Module:
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=LENGTH, **text_overrides,
        ),
        vision_config={
            **dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8),
            **(vision or {}),
        },
        projection_dim=DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.CLIPModel(config)


def image_features(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model.get_image_features(pixel_values=x, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4.x / 5.x


def text_features(model: nn.Module, ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    out = model.get_text_features(input_ids=ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def tokenized(lengths=(3, 1, 6)) -> dict[str, torch.Tensor]:
    """What the openai CLIP tokenizer returns with padding: BOS words EOS, padded with EOS."""
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(lengths), LENGTH), EOS, dtype=torch.long)
    mask = torch.zeros(len(lengths), LENGTH, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : 1 + n] = torch.randint(300, 40000, (n,), generator=g)
        mask[row, : n + 2] = 1
    return {"input_ids": ids, "attention_mask": mask}


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def last_layer_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last vision layer's input ``[B, 1 + N, W]`` during ``get_image_features(x)`` (a pre-hook,
    independent of ``hidden_states``)."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = model.vision_model.encoder.layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        image_features(model, x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def dense_reference(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The dense features written out from the last layer's weights: ``[B, N, D]``."""
    layer, vision = model.vision_model.encoder.layers[-1], model.vision_model
    attn, norm, post = layer.self_attn, layer.layer_norm1, vision.post_layernorm
    inp = last_layer_input(model, x)
    width, heads = inp.shape[-1], model.config.vision_config.num_attention_heads
    h = F.layer_norm(inp, (width,), norm.weight, norm.bias, norm.eps)
    q = h @ attn.q_proj.weight.T + attn.q_proj.bias
    v = h @ attn.v_proj.weight.T + attn.v_proj.bias
    if mode == "value":
        mixed = v[:, 1:]  # the patches' values, no attention
    else:
        outs, d = [], width // heads
        for head in range(heads):
            qh, vh = q[..., head * d:(head + 1) * d], v[..., head * d:(head + 1) * d]
            weights = torch.softmax(qh[:, 1:] @ qh.transpose(1, 2) / d**0.5, dim=-1)  # patches x all tokens
            outs.append(weights @ vh)
        mixed = torch.cat(outs, dim=-1)
    out = mixed @ attn.out_proj.weight.T + attn.out_proj.bias  # no residual, no MLP
    out = F.layer_norm(out, (width,), post.weight, post.bias, post.eps)
    return out @ model.visual_projection.weight.T


class HFClipRIS(nn.Module):
    """Projected patch tokens gated by the sentence feature, a 1×1 head, upsampled to the image."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.patch_in, self.sentence_in = nn.Linear(DIM, 8), nn.Linear(DIM, 8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, img: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vision = self.clip.vision_model(pixel_values=img)
        patches = self.clip.visual_projection(
            self.clip.vision_model.post_layernorm(vision.last_hidden_state[:, 1:]))
        sentence = self.clip.text_projection(
            self.clip.text_model(input_ids=ids, attention_mask=attention_mask).pooler_output)
        fused = self.patch_in(patches) * torch.sigmoid(self.sentence_in(sentence))[:, None]
        grid = rearrange(fused, "b (h w) c -> b c h w", h=4)
        return F.interpolate(self.head(grid), size=img.shape[-2:], mode="bilinear", align_corners=False)


def spec_for(model: HFClipRIS, image_tokens: Tap) -> HookSpec:
    return HookSpec(
        image=ModalitySpec(embed="clip.vision_model.embeddings.patch_embedding", layout="bchw",
                           tokens=image_tokens),
        text=ModalitySpec(embed="clip.text_model.embeddings.token_embedding",
                          maskable=Maskable(ids="ids", never=(BOS, EOS)),
                          tokens=Tap("clip.text_model", select=".last_hidden_state",
                                     project="clip.text_projection"),
                          global_=Tap("clip.text_projection")),
    )


PLAIN_TOKENS = Tap("clip.vision_model", select=".last_hidden_state[:, 1:]",
                   project=("clip.vision_model.post_layernorm", "clip.visual_projection"))

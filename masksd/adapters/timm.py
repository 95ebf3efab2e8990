"""Adapter: a ``timm`` Vision Transformer as a masksd image tower.

``timm`` is imported only inside ``tower_from_timm_vit`` (to check the model's class), so
``import masksd`` works without the optional dependency (``pip install "masksd[timm]"``).

Masking happens on the patch embeddings *before* timm adds position embeddings and prefix
tokens: ``embed`` runs ``model.patch_embed``; ``encode`` runs timm's public
``forward_intermediates`` (or ``forward_features`` when no levels are requested) with
``patch_embed``'s output replaced by the (masked) embedded tokens through a forward hook. So
the class and register tokens (never masked: they are not embedded tokens), the position
embeddings (also dynamic-size and RoPE variants), ``norm_pre``, the blocks and ``norm`` are
exactly timm's own, and a mask token still gets its position.

``TimmViTImageTower``
    ``embed``: patch embeddings ``[B, gh·gw, embed_dim]``, all maskable.
    ``encode``: ``global_feature`` = ``model.forward_head(x, pre_logits=True)`` on the final
    features (bit for bit what ``model.forward_head(model.forward_features(images),
    pre_logits=True)`` returns), or with the classifier ``head`` applied when ``head=True``
    (CLIP-style timm ViTs whose head is the image projection); ``tokens`` = the final patch
    tokens through ``fc_norm`` (and ``head``), i.e. normalised and projected like the pooled
    feature, ``[B, N, D]``; ``features`` = ``{"levels": [B, embed_dim, gh, gw] per requested
    block, "grid": (gh, gw), "tokens", "cls", "prefix": [B, num_prefix_tokens, embed_dim]}``.

Refused with a ``TypeError``: patch dropout (it drops tokens, so encoded tokens no longer line
up with embedded ones: build with ``patch_drop_rate=0``), attention-pool heads
(``global_pool='map'``) and ``global_pool=''`` (no global feature), distilled DeiT models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from masksd.adapters._hooks import substitute_output
from masksd.adapters.open_clip import _layer_indices
from masksd.towers import Embedded, Encoded

__all__ = ["TimmViTImageTower", "tower_from_timm_vit"]

_POOLS = ("token", "avg", "max", "avgmax")


class TimmViTImageTower(nn.Module):
    """A ``timm`` ``VisionTransformer`` as a masksd image ``Tower`` (see module docstring).

    Args:
        model: ``timm.create_model("vit_...", pretrained=..., patch_drop_rate=0.0)``.
        feature_layers: blocks (0-based, negatives from the end) whose patch tokens are returned
            in ``features["levels"]`` (through ``forward_intermediates``).
        head: apply ``model.head`` to the global feature and the tokens (use for timm CLIP ViTs
            built with ``num_classes`` = the joint embedding width); default: pre-logits.
    """

    def __init__(self, model: nn.Module, *, feature_layers: Sequence[int] = (), head: bool = False) -> None:
        super().__init__()
        required = ("patch_embed", "blocks", "forward_intermediates", "forward_features", "forward_head",
                    "fc_norm", "num_prefix_tokens", "global_pool")
        missing = [name for name in required if not hasattr(model, name)]
        if missing:
            raise TypeError(
                f"model must be a timm VisionTransformer (timm>=1.0.3); {type(model).__name__} lacks "
                f"{', '.join(missing)}"
            )
        if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
            raise TypeError(
                "patch dropout drops tokens, so encoded tokens no longer line up with embedded ones; "
                "build the model with timm.create_model(..., patch_drop_rate=0.0)"
            )
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in _POOLS:
            raise TypeError(
                f"global_pool={model.global_pool!r} is not supported (attention pools have no per-token "
                f"counterpart, '' gives no global feature); build the model with global_pool in {_POOLS}"
            )
        self.model = model
        self.head = bool(head)
        self.embed_dim: int = int(model.embed_dim)
        self.feature_layers = _layer_indices(feature_layers, len(model.blocks), "feature_layers")

    def embed(self, inputs: Tensor) -> Embedded:
        """Images ``[B, 3, H, W]`` → patch embeddings ``[B, gh·gw, embed_dim]``, all maskable."""
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            found = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(f"images must be a [B, C, H, W] tensor, got {found}")
        patch_embed = self.model.patch_embed
        try:
            patches = patch_embed(inputs)
        except AssertionError as error:  # timm's own size check (strict_img_size)
            raise ValueError(
                f"images of size {tuple(inputs.shape[-2:])} do not fit the model ({error}); resize "
                "them, or create the model with img_size=... or dynamic_img_size=True"
            ) from error
        if patches.dim() == 4:  # NHWC (dynamic_img_size=True)
            grid = (int(patches.shape[1]), int(patches.shape[2]))
            tokens = rearrange(patches, "b h w c -> b (h w) c")
        else:  # [B, N, C]
            gh, gw = patch_embed.dynamic_feat_size(tuple(inputs.shape[-2:]))
            grid = (int(gh), int(gw))
            tokens = patches
        maskable = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        extras = {"images": inputs, "grid": grid, "nhwc": patches.dim() == 4}
        return Embedded(tokens=tokens, maskable=maskable, extras=extras, grid=grid)

    def _project(self, x: Tensor) -> Tensor:
        return self.model.head(x) if self.head else x

    def encode(self, embedded: Embedded) -> Encoded:
        """Patch embeddings ``[B, N, embed_dim]`` → ``Encoded`` (see module docstring)."""
        model = self.model
        gh, gw = embedded.extras["grid"]
        replacement = embedded.tokens
        if embedded.extras["nhwc"]:
            replacement = rearrange(replacement, "b (h w) c -> b h w c", h=gh, w=gw)
        images = embedded.extras["images"]
        levels: list[Tensor] = []
        with substitute_output(model.patch_embed, replacement, name="patch_embed"):
            if self.feature_layers:
                final, levels = model.forward_intermediates(
                    images, indices=list(self.feature_layers), output_fmt="NCHW"
                )
            else:
                final = model.forward_features(images)
        pooled = model.forward_head(final, pre_logits=not self.head)
        prefix = final[:, : model.num_prefix_tokens]
        tokens = self._project(model.fc_norm(final[:, model.num_prefix_tokens :]))  # [B, N, D]
        features: dict[str, Any] = {
            "levels": list(levels),
            "grid": (gh, gw),
            "tokens": tokens,
            "cls": pooled,
            "prefix": prefix,
        }
        return Encoded(tokens=tokens, global_feature=pooled, features=features)


def tower_from_timm_vit(
    model: nn.Module, *, image_layers: Sequence[int] = (), head: bool = False
) -> TimmViTImageTower:
    """Wrap a ``timm`` ``VisionTransformer`` as a masksd image tower (shares its weights).

    Pair it with any text tower whose ``global_feature`` has the width of this tower's tokens
    (``model.embed_dim``, or ``model.num_classes`` with ``head=True``).

    Args:
        model: e.g. ``timm.create_model("vit_base_patch16_224", pretrained=True,
            patch_drop_rate=0.0)``.
        image_layers: blocks returned as ``features["levels"]`` (e.g. ``(3, 7, 11)``).
        head: apply ``model.head`` (see ``TimmViTImageTower``).
    """
    try:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as error:  # pragma: no cover - exercised only without timm
        raise ImportError('tower_from_timm_vit needs timm: pip install "masksd[timm]"') from error
    if not isinstance(model, VisionTransformer) or isinstance(model, VisionTransformerDistilled):
        raise TypeError(
            "model must be a timm VisionTransformer (not a distilled DeiT, whose head pools two "
            f"tokens), got {type(model).__name__}"
        )
    return TimmViTImageTower(model, feature_layers=image_layers, head=head)

"""Adapter: an ``open_clip`` CLIP (ViT or ResNet image tower + standard text tower) as two towers.

Nothing here imports ``open_clip``: the towers use the modules of a model the user built with
``open_clip.create_model(...)``, so ``import masksd`` works without the optional dependency.

Image tower (``OpenCLIPImageTower``)
    ``embed``: patch embeddings after ``conv1``, ``[B, N, width]`` with ``N = gh · gw``; every
    patch is maskable. The class token and the positional embeddings are added in ``encode``,
    so a mask token still gets its position (MAE/SimMIM style) and the class token is never
    masked.
    ``encode``: class token + positional embeddings, ``ln_pre``, the transformer (collecting
    intermediate layers), ``ln_post``; ``tokens`` = patch tokens projected by ``proj`` into
    CLIP's joint space ``[B, N, D]``; ``global_feature`` = the projected pooled feature (what
    ``clip.encode_image`` returns, bit for bit); ``features`` = ``{"levels": [B, width, gh, gw]
    per requested layer, "grid": (gh, gw), "tokens": ..., "cls": ...}``. With ``dense="value"`` /
    ``"clearclip"``, ``Encoded.scoring`` holds dense-alignment patch features from the last block's
    input (``masksd.adapters.clip_dense``), computed only when a scorer reads them; ``tokens``, the
    global feature and the levels stay the same.

ResNet image tower (``OpenCLIPResNetImageTower``, for RN50-style ``ModifiedResNet`` CLIPs)
    ``embed``: stem output (3 convs + average pool) ``[B, (H/4)·(W/4), width]``, all maskable.
    ``encode``: ``layer1``-``layer4`` and the attention pool; ``global_feature`` = what
    ``clip.encode_image`` returns (bit for bit); ``tokens`` = MaskCLIP-style dense features
    ``c_proj(v_proj(layer4))`` on the ``(H/32, W/32)`` grid, given as ``Encoded.grid`` so that
    masksd selects on that coarse grid; ``features["levels"]`` = stage outputs (default 2, 3, 4).

Text tower (``OpenCLIPTextTower``, the same for ViT and ResNet CLIPs)
    ``embed``: word embeddings ``token_embedding(ids)`` ``[B, L, width]``; maskable =
    not padding, not SOT, not EOT. Pooling still uses the original token ids (the EOT position,
    which carries CLIP's sentence feature and is never masked).
    ``encode``: positional embeddings (sliced to ``L``, so short contexts such as RefCOCO's 17
    tokens work), the causal transformer, ``ln_final``; ``tokens`` = per-word features projected
    by ``text_projection`` ``[B, L, D]``; ``global_feature`` = what ``clip.encode_text`` returns;
    ``features`` = ``{"words": [B, L, width] (CRIS uses the unprojected words), "pad_mask":
    [B, L] bool (True = padding), "levels": [...], "ids": [B, L]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from masksd.adapters.clip_dense import check_block, check_mode, joint_dense_tokens
from masksd.towers import Embedded, Encoded

__all__ = ["OpenCLIPImageTower", "OpenCLIPResNetImageTower", "OpenCLIPTextTower", "towers_from_open_clip"]

CLIP_SOT_TOKEN_ID = 49406
CLIP_EOT_TOKEN_ID = 49407
CLIP_PAD_TOKEN_ID = 0


def _layer_indices(layers: Sequence[int], depth: int, argument: str) -> tuple[int, ...]:
    indices = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{argument} must hold ints, got {layer!r}")
        index = layer if layer >= 0 else depth + layer
        if not 0 <= index < depth:
            raise ValueError(f"{argument}: layer {layer} out of range for a {depth}-layer transformer")
        indices.append(index)
    return tuple(indices)


def _require_intermediates(transformer: nn.Module, layers: tuple[int, ...]) -> None:
    if layers and not callable(getattr(transformer, "forward_intermediates", None)):
        raise TypeError(
            "feature layers need open_clip's Transformer.forward_intermediates (open_clip_torch 2.32 "
            'or newer); upgrade open_clip (pip install "masksd[clip]") or request no layers'
        )


def _run_blocks(transformer: nn.Module, x: Tensor, attn_mask: Tensor | None, take: tuple[int, ...]):
    """Run open_clip ``Transformer`` blocks on ``x [B, N, W]``; also return layers ``take``."""
    if not getattr(transformer, "batch_first", True):
        raise TypeError("only batch-first open_clip transformers are supported")
    if not take:
        return transformer(x, attn_mask=attn_mask), []
    return transformer.forward_intermediates(x, attn_mask=attn_mask, indices=list(take))


def _vit_pool(x: Tensor, pool_type: str) -> Tensor:
    """``[B, 1 + N, W]`` → ``[B, W]``: the class token (``"tok"``) or the mean patch (``"avg"``)."""
    return x[:, 1:].mean(dim=1) if pool_type == "avg" else x[:, 0]


class OpenCLIPImageTower(nn.Module):
    """The ViT of an open_clip CLIP as a masksd ``Tower`` (see module docstring).

    Args:
        visual: ``clip.visual``, an open_clip ``VisionTransformer``.
        feature_layers: transformer layers (0-based, negatives from the end) whose patch tokens
            are returned in ``features["levels"]`` for a neck.
        dense: None (scorers read the plain projected patch tokens, the paper), ``"value"``
            (MaskCLIP's value path) or ``"clearclip"`` (q-q attention): what ``Encoded.scoring``
            holds (``masksd.adapters.clip_dense``).
    """

    def __init__(
        self, visual: nn.Module, *, feature_layers: Sequence[int] = (), dense: str | None = None
    ) -> None:
        super().__init__()
        required = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
        missing = [name for name in required if not hasattr(visual, name)]
        if missing:
            raise TypeError(
                "visual must be an open_clip VisionTransformer (clip.visual of a ViT model); "
                f"{type(visual).__name__} lacks {', '.join(missing)}. ResNet CLIPs use "
                "OpenCLIPResNetImageTower; open_clip's timm-based towers (TimmModel) are not supported"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("open_clip ViTs with attentional pooling (CoCa) are not supported")
        self.pool_type: str = getattr(visual, "pool_type", "tok")
        if self.pool_type not in ("tok", "avg"):
            raise TypeError(f"unsupported ViT pool_type {self.pool_type!r}")
        if not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity):
            raise TypeError(
                "patch dropout drops tokens, so encoded tokens no longer line up with embedded "
                "ones; build the CLIP with patch_dropout=0"
            )
        self.visual = visual
        self.embed_dim: int = int(visual.conv1.out_channels)
        self.feature_layers = _layer_indices(
            feature_layers, len(visual.transformer.resblocks), "feature_layers"
        )
        _require_intermediates(visual.transformer, self.feature_layers)
        if dense is not None:
            check_mode(dense, "dense")
            _require_intermediates(visual.transformer, (0,))
            check_block(visual.transformer.resblocks[-1], "dense: the ViT's last block")
        self.dense = dense

    def embed(self, inputs: Tensor) -> Embedded:
        """Images ``[B, 3, H, W]`` → patch embeddings ``[B, gh·gw, width]``, all maskable."""
        if not isinstance(inputs, Tensor) or inputs.dim() != 4 or inputs.shape[1] != 3:
            raise ValueError(
                "images must be a [B, 3, H, W] tensor, got "
                f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}"
            )
        patches = self.visual.conv1(inputs.to(self.visual.conv1.weight.dtype))
        grid = (int(patches.shape[-2]), int(patches.shape[-1]))
        expected = self.visual.positional_embedding.shape[0] - 1
        if grid[0] * grid[1] != expected:
            raise ValueError(
                f"images of size {tuple(inputs.shape[-2:])} give a {grid[0]}x{grid[1]} patch grid "
                f"but the model's positional embedding has {expected} patch positions; build the "
                "CLIP with force_image_size set to the training resolution"
            )
        tokens = rearrange(patches, "b c h w -> b (h w) c")
        maskable = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Embedded(tokens=tokens, maskable=maskable, extras={"grid": grid}, grid=grid)

    def encode(self, embedded: Embedded) -> Encoded:
        """Patch embeddings ``[B, N, width]`` → ``Encoded`` (see module docstring)."""
        visual = self.visual
        x = embedded.tokens
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        dense, block_input = self.dense, x  # the last block's input: x, or the output of the block before it
        if dense is None:
            x, intermediates = _run_blocks(visual.transformer, x, None, self.feature_layers)
        else:
            before_last = len(visual.transformer.resblocks) - 2
            take = sorted({*self.feature_layers, *([before_last] if before_last >= 0 else [])})
            x, taken = _run_blocks(visual.transformer, x, None, tuple(take))
            block_input = dict(zip(take, taken)).get(before_last, block_input)
            intermediates = [t for i, t in zip(take, taken) if i in self.feature_layers]
        normed = visual.ln_post(x)
        # open_clip's pooling for pool_type "tok" / "avg" (checked in __init__), written out here
        # because open_clip exposes it only as a private method
        if getattr(visual, "final_ln_after_pool", False):
            pooled = visual.ln_post(_vit_pool(x, self.pool_type))
        else:
            pooled = _vit_pool(normed, self.pool_type)
        tokens = normed[:, 1:]  # per-token features for scoring, normalised like the pool
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            tokens = tokens @ visual.proj
        gh, gw = embedded.extras["grid"]
        levels = [rearrange(t[:, 1:], "b (h w) c -> b c h w", h=gh, w=gw) for t in intermediates]
        features = {"levels": levels, "grid": (gh, gw), "tokens": tokens, "cls": pooled}
        scoring = None if dense is None else partial(joint_dense_tokens, visual, block_input, mode=dense)
        return Encoded(tokens=tokens, global_feature=pooled, features=features, scoring=scoring)


class OpenCLIPResNetImageTower(nn.Module):
    """The ``ModifiedResNet`` of an open_clip ResNet CLIP (RN50, ...) as a masksd ``Tower``.

    ``embed``: the 3-conv stem and its average pool, ``[B, width, H/4, W/4]`` flattened to
    ``[B, (H/4)·(W/4), width]``, all maskable, ``Embedded.grid = (H/4, W/4)``.
    ``encode``: ``layer1`` … ``layer4`` and the attention pool; ``global_feature`` =
    ``clip.encode_image(x)`` bit for bit. ``tokens`` ``[B, (H/32)·(W/32), D]`` are dense
    CLIP-space features computed the MaskCLIP way (Zhou et al., 2022): the attention pool's
    value and output projections applied to every ``layer4`` position,
    ``c_proj(v_proj(f))``, *without* the pool's positional embedding (it would add the same
    position-dependent offset to every image's scores and so bias selection towards fixed
    positions), ``Encoded.grid = (H/32, W/32)``: masksd selects on that grid and expands the
    mask (nearest) onto the stem grid, so a masked unit is an 8×8 block of stem positions.
    ``features`` = ``{"levels": [B, C_s, H/2^(s+1), W/2^(s+1)] per requested stage s (default
    2, 3, 4), "grid": (H/32, W/32), "tokens", "cls"}``.

    Args:
        visual: ``clip.visual``, an open_clip ``ModifiedResNet``.
        feature_stages: residual stages (1–4) returned in ``features["levels"]``.
    """

    def __init__(self, visual: nn.Module, *, feature_stages: Sequence[int] = (2, 3, 4)) -> None:
        super().__init__()
        required = ("stem", "layer1", "layer2", "layer3", "layer4", "attnpool")
        missing = [name for name in required if not hasattr(visual, name)]
        if missing:
            raise TypeError(
                f"visual must be an open_clip ModifiedResNet; {type(visual).__name__} lacks "
                f"{', '.join(missing)}"
            )
        for stage in feature_stages:
            if isinstance(stage, bool) or stage not in (1, 2, 3, 4):
                raise ValueError(f"feature_stages must hold stage numbers 1-4, got {stage!r}")
        self.visual = visual
        self.feature_stages = tuple(int(stage) for stage in feature_stages)
        self.embed_dim: int = int(visual.conv3.out_channels)
        side = round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
        self.pool_grid = (side, side)

    def embed(self, inputs: Tensor) -> Embedded:
        """Images ``[B, 3, H, W]`` (H = W = 32 × the pool's side) → stem tokens, all maskable."""
        if not isinstance(inputs, Tensor) or inputs.dim() != 4 or inputs.shape[1] != 3:
            found = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got {found}")
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        expected = (32 * self.pool_grid[0], 32 * self.pool_grid[1])
        if size != expected:
            raise ValueError(
                f"images of size {size} do not fit this ResNet CLIP: its attention pool's positional "
                f"embedding covers a {self.pool_grid[0]}x{self.pool_grid[1]} grid after layer4, i.e. "
                f"{expected} images; resize them or build the CLIP with that image_size"
            )
        stem = self.visual.stem(inputs.to(self.visual.conv1.weight.dtype))  # [B, C, H/4, W/4]
        grid = (int(stem.shape[-2]), int(stem.shape[-1]))
        tokens = rearrange(stem, "b c h w -> b (h w) c")
        maskable = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Embedded(tokens=tokens, maskable=maskable, extras={"grid": grid}, grid=grid)

    def encode(self, embedded: Embedded) -> Encoded:
        """Stem tokens ``[B, N, width]`` → ``Encoded`` (see class docstring)."""
        visual = self.visual
        gh, gw = embedded.extras["grid"]
        x = rearrange(embedded.tokens, "b (h w) c -> b c h w", h=gh, w=gw).contiguous()
        stages = []
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
            stages.append(x)
        pooled = visual.attnpool(x)  # = clip.encode_image
        pool = visual.attnpool
        unit_grid = (int(x.shape[-2]), int(x.shape[-1]))
        tokens = pool.c_proj(pool.v_proj(rearrange(x, "b c h w -> b (h w) c")))  # [B, N_u, D]
        levels = [stages[stage - 1] for stage in self.feature_stages]
        features = {"levels": levels, "grid": unit_grid, "tokens": tokens, "cls": pooled}
        return Encoded(tokens=tokens, global_feature=pooled, features=features, grid=unit_grid)


class OpenCLIPTextTower(nn.Module):
    """The text transformer of an open_clip ``CLIP`` as a masksd ``Tower``.

    Args:
        clip: an open_clip ``CLIP`` (the text modules live on the model itself).
        feature_layers: layers whose word features are returned in ``features["levels"]``.
        sot_token_id / eot_token_id / pad_token_id: special token ids (CLIP's BPE defaults);
            these positions are never maskable.
    """

    def __init__(
        self,
        clip: nn.Module,
        *,
        feature_layers: Sequence[int] = (),
        sot_token_id: int = CLIP_SOT_TOKEN_ID,
        eot_token_id: int = CLIP_EOT_TOKEN_ID,
        pad_token_id: int = CLIP_PAD_TOKEN_ID,
    ) -> None:
        super().__init__()
        required = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        missing = [name for name in required if not hasattr(clip, name)]
        if missing:
            raise TypeError(
                f"clip must be an open_clip CLIP with the standard text tower; {type(clip).__name__} "
                f"lacks {', '.join(missing)} (CustomTextCLIP / HF text towers need their own adapter)"
            )
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.pool_type: str = getattr(clip, "text_pool_type", "argmax")
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.embed_dim: int = int(clip.token_embedding.embedding_dim)
        self.special_ids = (sot_token_id, eot_token_id, pad_token_id)
        self.pad_token_id = pad_token_id
        self.feature_layers = _layer_indices(
            feature_layers, len(clip.transformer.resblocks), "feature_layers"
        )
        _require_intermediates(clip.transformer, self.feature_layers)

    def embed(self, inputs: Tensor) -> Embedded:
        """Token ids ``[B, L]`` (L ≤ the model's context length) → word embeddings ``[B, L, width]``."""
        if (
            not isinstance(inputs, Tensor) or inputs.dim() != 2
            or inputs.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError(
                "texts must be integer token ids of shape [B, L], got "
                f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}"
                f"{' ' + str(inputs.dtype) if isinstance(inputs, Tensor) else ''}"
            )
        context = self.positional_embedding.shape[0]
        if inputs.shape[1] > context:
            raise ValueError(f"texts have {inputs.shape[1]} tokens; the model's context length is {context}")
        ids = inputs.long()
        maskable = torch.ones_like(ids, dtype=torch.bool)
        for special in self.special_ids:
            maskable &= ids != special
        tokens = self.token_embedding(ids)
        return Embedded(tokens=tokens, maskable=maskable, extras={"ids": ids})

    def _pool(self, x: Tensor, ids: Tensor) -> Tensor:
        batch = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "argmax":
            return x[batch, ids.argmax(dim=-1)]
        if self.pool_type == "eos" and self.eos_id is not None:
            return x[batch, (ids == self.eos_id).int().argmax(dim=-1)]
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        raise TypeError(f"unsupported text pool_type {self.pool_type!r}")

    def _project(self, x: Tensor) -> Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def encode(self, embedded: Embedded) -> Encoded:
        """Word embeddings ``[B, L, width]`` → ``Encoded`` (see module docstring)."""
        ids: Tensor = embedded.extras["ids"]
        length = ids.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = embedded.tokens.to(cast) + self.positional_embedding[:length].to(cast)
        attn_mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x, intermediates = _run_blocks(self.transformer, x, attn_mask, self.feature_layers)
        x = self.ln_final(x)
        pooled = self._project(self._pool(x, ids))
        tokens = self._project(x)
        features: dict[str, Any] = {
            "words": x,
            "pad_mask": ids == self.pad_token_id,
            "levels": intermediates,
            "ids": ids,
            "sentence": pooled,
        }
        return Encoded(tokens=tokens, global_feature=pooled, features=features)


def towers_from_open_clip(
    clip: nn.Module,
    *,
    image_layers: Sequence[int] | None = None,
    text_layers: Sequence[int] = (),
    dense: str | None = None,
) -> tuple[OpenCLIPImageTower | OpenCLIPResNetImageTower, OpenCLIPTextTower]:
    """Split an open_clip ``CLIP`` (ViT or ResNet image tower) into ``(image_tower, text_tower)``.

    The towers share the model's parameters (nothing is copied).

    Args:
        clip: e.g. ``open_clip.create_model("ViT-B-16", pretrained=..., force_image_size=480)``
            or ``open_clip.create_model("RN50", pretrained=...)``.
        image_layers: ViT: transformer layers returned as ``features["levels"]`` (e.g.
            ``(3, 7, 11)``; default none). ResNet: residual stages 1-4 (default ``(2, 3, 4)``).
        text_layers: text layers returned as ``features["levels"]``.
        dense: ViT only: ``"value"`` (MaskCLIP) or ``"clearclip"`` scoring features for the
            patches, ``Encoded.scoring`` (``masksd.adapters.clip_dense``); None: the plain patch
            tokens (the paper). ResNet CLIPs already score MaskCLIP's dense ``c_proj(v_proj(.))``.
    """
    if not hasattr(clip, "visual"):
        raise TypeError(f"clip must be an open_clip CLIP model, got {type(clip).__name__}")
    text_tower = OpenCLIPTextTower(clip, feature_layers=text_layers)
    if hasattr(clip.visual, "attnpool") and hasattr(clip.visual, "layer4"):  # ModifiedResNet
        if dense is not None:
            raise ValueError(
                f"dense={dense!r} needs a ViT CLIP; this is a ResNet CLIP, whose tower already scores "
                "MaskCLIP's dense features c_proj(v_proj(layer4)): leave dense=None"
            )
        stages = (2, 3, 4) if image_layers is None else image_layers
        return OpenCLIPResNetImageTower(clip.visual, feature_stages=stages), text_tower
    layers = () if image_layers is None else image_layers
    return OpenCLIPImageTower(clip.visual, feature_layers=layers, dense=dense), text_tower

"""Adapter: a Hugging Face ``transformers.CLIPModel`` as two masksd towers.

Nothing here imports ``transformers``: the towers use the modules of a model the user built
(``CLIPModel.from_pretrained(...)`` or ``CLIPModel(CLIPConfig(...))``), so ``import masksd``
works without the optional dependency (``pip install "masksd[hf]"``).

Masking happens on the embeddings *before* position embeddings are added: ``embed`` runs the
model's own embedding module (the patch conv ``vision_model.embeddings.patch_embedding``, the
word table ``text_model.embeddings.token_embedding``); ``encode`` runs the model's public
forward (``vision_model(...)`` / ``text_model(...)`` with ``output_hidden_states=True``) with
that module's output replaced by the (masked) embedded tokens through a forward hook. So the
class token, the position embeddings (interpolated or not), the encoder, the final norms and the
EOS pooling are exactly transformers' own, and a mask token still gets its position.

Image tower (``HFCLIPImageTower``)
    ``embed``: patch embeddings ``[B, gh·gw, hidden]``, all maskable (the class token is added by
    the model in ``encode`` and is never masked).
    ``encode``: ``tokens`` = patch tokens after ``post_layernorm`` projected by
    ``visual_projection`` ``[B, N, D]`` (normalised and projected like the pooled class token);
    ``global_feature`` = ``model.get_image_features(pixel_values)`` bit for bit; ``features`` =
    ``{"levels": [B, hidden, gh, gw] per requested layer, "grid": (gh, gw), "tokens", "cls"}``.
    With ``dense="value"`` / ``"clearclip"``, ``Encoded.scoring`` holds dense-alignment patch
    features ``[B, N, D]`` from the last encoder layer's input (``hidden_states[-2]``) and its own
    weights (``masksd.adapters.clip_dense``), computed only when a scorer reads them; ``tokens``,
    the global feature and the levels stay the same.

Text tower (``HFCLIPTextTower``)
    ``embed``: word embeddings ``[B, L, hidden]``; maskable = attended (``attention_mask``),
    not BOS, and strictly before the EOS position that CLIP pools (so EOS and any padding after
    it are never masked). Inputs: ids ``[B, L]`` or a tokenizer output (a mapping with
    ``input_ids`` and optionally ``attention_mask``).
    ``encode``: ``tokens`` = ``text_projection`` of every position ``[B, L, D]``;
    ``global_feature`` = ``model.get_text_features(input_ids, attention_mask)`` bit for bit;
    ``features`` = ``{"words": [B, L, hidden] (after the final layer norm), "pad_mask": [B, L]
    bool (True = padding), "levels": [B, L, hidden] per requested layer, "ids", "attention_mask",
    "sentence"}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from masksd.adapters._hooks import substitute_output
from masksd.adapters.clip_dense import check_mode, dense_block_tokens, hf_layer_problem
from masksd.adapters.open_clip import _layer_indices
from masksd.towers import Embedded, Encoded

__all__ = ["HFCLIPImageTower", "HFCLIPTextTower", "hf_dense_tokens", "towers_from_hf_clip"]


def _pooled(output: Any) -> Tensor:
    """``pooler_output`` of a transformers model output (4.x and 5.x)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output[1]


def _check_dense_layer(vision: nn.Module) -> None:
    """Raise a TypeError unless the vision encoder's last layer is a ``CLIPEncoderLayer`` that dense
    scoring can read: ``layer_norm1``, and ``self_attn`` with ``q_proj`` / ``v_proj`` / ``out_proj``
    (``nn.Linear``), ``num_heads``, ``head_dim`` (``num_heads · head_dim`` = the width) and ``scale``."""
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
        raise TypeError(
            "dense: scoring features need the vision encoder's layers (vision_model.encoder.layers), "
            f"which {type(vision).__name__} lacks; leave dense=None for this model"
        )
    problem = hf_layer_problem(layers[-1])
    if problem is not None:
        raise TypeError(
            "dense: scoring features need a transformers CLIPEncoderLayer as the vision encoder's last "
            f"layer; its {type(layers[-1]).__name__} {problem}; leave dense=None for this model"
        )


def hf_dense_tokens(vision: nn.Module, projection: nn.Module, x: Tensor, *, mode: str) -> Tensor:
    """Dense-alignment patch features of a transformers CLIP vision model (``masksd.adapters.clip_dense``).

    Args:
        vision: ``model.vision_model`` (a ``CLIPVisionTransformer``).
        projection: ``model.visual_projection``.
        x: the last encoder layer's input ``[B, 1 + N, hidden]`` (class token first), i.e.
            ``vision(..., output_hidden_states=True).hidden_states[-2]``.
        mode: ``"value"`` (MaskCLIP) or ``"clearclip"`` (q-q attention).

    Returns:
        ``[B, N, D]``: ``visual_projection(post_layernorm(out_proj(mix)))`` with ``mix`` from
        ``dense_mix`` on ``layer_norm1(x)`` (no residual, no MLP), without gradient.
    """
    with torch.no_grad():
        return projection(vision.post_layernorm(dense_block_tokens(vision.encoder.layers[-1], x, mode=mode)))


class HFCLIPImageTower(nn.Module):
    """The vision side of a ``transformers.CLIPModel`` as a masksd ``Tower``.

    Args:
        model: a ``CLIPModel`` (``vision_model`` and ``visual_projection`` are used, shared).
        feature_layers: encoder layers (0-based, negatives from the end) whose patch tokens are
            returned in ``features["levels"]`` as ``[B, hidden, gh, gw]``.
        interpolate_pos_encoding: let the model interpolate its position embeddings for images
            of another size than ``vision_config.image_size`` (transformers' own option).
        dense: ``"value"`` (MaskCLIP) or ``"clearclip"`` scoring features for the patches,
            ``Encoded.scoring`` ``[B, N, D]``; None: the scorers read the plain ``tokens``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        feature_layers: Sequence[int] = (),
        interpolate_pos_encoding: bool = False,
        dense: str | None = None,
    ) -> None:
        super().__init__()
        vision = getattr(model, "vision_model", None)
        embeddings = getattr(vision, "embeddings", None)
        if not isinstance(getattr(embeddings, "patch_embedding", None), nn.Conv2d) or not hasattr(
            model, "visual_projection"
        ):
            raise TypeError(
                "model must be a transformers CLIPModel (with vision_model.embeddings."
                f"patch_embedding and visual_projection), got {type(model).__name__}"
            )
        if interpolate_pos_encoding and "interpolate_pos_encoding" not in inspect.signature(
            vision.forward
        ).parameters:
            raise TypeError(
                "interpolate_pos_encoding=True needs a transformers version whose CLIP vision model "
                "accepts it (4.46 or newer); upgrade transformers or use images of "
                "vision_config.image_size"
            )
        self.vision_model = vision
        self.visual_projection = model.visual_projection
        self.interpolate_pos_encoding = bool(interpolate_pos_encoding)
        self.image_size = int(vision.config.image_size)
        self.patch_size = int(vision.config.patch_size)
        self.embed_dim: int = int(embeddings.patch_embedding.out_channels)
        self.feature_layers = _layer_indices(
            feature_layers, int(vision.config.num_hidden_layers), "feature_layers"
        )
        if dense is not None:
            check_mode(dense, "dense")
            _check_dense_layer(vision)
        self.dense = dense

    def embed(self, inputs: Tensor) -> Embedded:
        """Pixel values ``[B, 3, H, W]`` → patch embeddings ``[B, gh·gw, hidden]``, all maskable."""
        if not isinstance(inputs, Tensor) or inputs.dim() != 4 or inputs.shape[1] != 3:
            found = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(
                f"images must be a pixel_values tensor [B, 3, H, W], got {found} (pass "
                "processor(images=...)['pixel_values'])"
            )
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        if not self.interpolate_pos_encoding and size != (self.image_size, self.image_size):
            raise ValueError(
                f"images of size {size} do not match the model's image_size {self.image_size}; "
                "resize them or build the towers with interpolate_pos_encoding=True"
            )
        conv = self.vision_model.embeddings.patch_embedding
        patches = conv(inputs.to(conv.weight.dtype))  # [B, C, gh, gw]
        grid = (int(patches.shape[-2]), int(patches.shape[-1]))
        tokens = rearrange(patches, "b c h w -> b (h w) c")
        maskable = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Embedded(tokens=tokens, maskable=maskable, extras={"images": inputs, "grid": grid}, grid=grid)

    def encode(self, embedded: Embedded) -> Encoded:
        """Patch embeddings ``[B, N, hidden]`` → ``Encoded`` (see module docstring)."""
        gh, gw = embedded.extras["grid"]
        patches = rearrange(embedded.tokens, "b (h w) c -> b c h w", h=gh, w=gw)
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if self.interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        name = "vision_model.embeddings.patch_embedding"
        with substitute_output(self.vision_model.embeddings.patch_embedding, patches, name=name):
            output = self.vision_model(pixel_values=embedded.extras["images"], **kwargs)
        pooled = self.visual_projection(_pooled(output))  # = get_image_features
        patch_tokens = self.vision_model.post_layernorm(output.last_hidden_state[:, 1:])
        tokens = self.visual_projection(patch_tokens)  # [B, N, D]
        levels = [
            rearrange(output.hidden_states[i + 1][:, 1:], "b (h w) c -> b c h w", h=gh, w=gw)
            for i in self.feature_layers
        ]
        features = {"levels": levels, "grid": (gh, gw), "tokens": tokens, "cls": pooled}
        scoring = None
        if self.dense is not None:  # hidden_states[-2]: the last layer's input (4.40 through 5.x)
            block_input = output.hidden_states[-2]
            scoring = partial(hf_dense_tokens, self.vision_model, self.visual_projection, block_input,
                              mode=self.dense)
        return Encoded(tokens=tokens, global_feature=pooled, features=features, scoring=scoring)


class HFCLIPTextTower(nn.Module):
    """The text side of a ``transformers.CLIPModel`` as a masksd ``Tower``.

    Args:
        model: a ``CLIPModel`` (``text_model`` and ``text_projection`` are used, shared).
        feature_layers: encoder layers whose hidden states are returned in
            ``features["levels"]`` as ``[B, L, hidden]``.
    """

    def __init__(self, model: nn.Module, *, feature_layers: Sequence[int] = ()) -> None:
        super().__init__()
        text = getattr(model, "text_model", None)
        embeddings = getattr(text, "embeddings", None)
        if not isinstance(getattr(embeddings, "token_embedding", None), nn.Embedding) or not hasattr(
            model, "text_projection"
        ):
            raise TypeError(
                "model must be a transformers CLIPModel (with text_model.embeddings."
                f"token_embedding and text_projection), got {type(model).__name__}"
            )
        self.text_model = text
        self.text_projection = model.text_projection
        config = text.config
        self.bos_token_id = int(config.bos_token_id)
        self.eos_token_id = int(config.eos_token_id)
        self.context_length = int(config.max_position_embeddings)
        self.embed_dim: int = int(embeddings.token_embedding.embedding_dim)
        self.feature_layers = _layer_indices(
            feature_layers, int(config.num_hidden_layers), "feature_layers"
        )

    @property
    def word_embedding(self) -> nn.Embedding:
        """The input word table (objectives such as Mask Grounding tie their output layer to it)."""
        return self.text_model.embeddings.token_embedding

    def _inputs(self, inputs: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(inputs, Mapping):
            if "input_ids" not in inputs:
                raise ValueError(
                    f"texts given as a mapping must hold 'input_ids', got keys {sorted(inputs)}"
                )
            ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        else:
            ids, attention_mask = inputs, None
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            found = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(
                "texts must be integer input_ids [B, L] or a tokenizer output with input_ids "
                f"(return_tensors='pt'), got {found}"
            )
        if ids.shape[1] > self.context_length:
            raise ValueError(
                f"texts have {ids.shape[1]} tokens; the model's max_position_embeddings is "
                f"{self.context_length} (tokenize with truncation=True, max_length={self.context_length})"
            )
        if attention_mask is not None and (
            not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(ids.shape)
        ):
            found = (tuple(attention_mask.shape) if isinstance(attention_mask, Tensor)
                     else type(attention_mask).__name__)
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, "
                             f"got {found}")
        return ids.long(), attention_mask

    def _pool_index(self, ids: Tensor) -> Tensor:
        """``[B]`` position CLIP pools: first EOS (argmax of ids for legacy configs with EOS = 2)."""
        if self.eos_token_id == 2:  # transformers' own legacy rule (configs before PR #24773)
            return ids.argmax(dim=-1)
        has_eos = (ids == self.eos_token_id).any(dim=-1)
        if not bool(has_eos.all()):
            rows = has_eos.logical_not().nonzero().flatten().tolist()
            raise ValueError(
                f"texts rows {rows} contain no EOS token (id {self.eos_token_id}), so CLIP would pool "
                "an arbitrary position; tokenize with the model's CLIP tokenizer (it appends EOS) and "
                "truncate so that EOS stays"
            )
        return (ids == self.eos_token_id).int().argmax(dim=-1)

    def embed(self, inputs: Any) -> Embedded:
        """ids ``[B, L]`` (or ``{"input_ids", "attention_mask"}``) → words ``[B, L, hidden]``."""
        ids, attention_mask = self._inputs(inputs)
        positions = torch.arange(ids.shape[1], device=ids.device)
        maskable = (ids != self.bos_token_id) & (positions[None] < self._pool_index(ids)[:, None])
        if attention_mask is not None:
            maskable &= attention_mask.bool()
        tokens = self.text_model.embeddings.token_embedding(ids)
        extras = {"ids": ids, "attention_mask": attention_mask}
        return Embedded(tokens=tokens, maskable=maskable, extras=extras)

    def encode(self, embedded: Embedded) -> Encoded:
        """Word embeddings ``[B, L, hidden]`` → ``Encoded`` (see module docstring)."""
        ids: Tensor = embedded.extras["ids"]
        attention_mask: Tensor | None = embedded.extras["attention_mask"]
        name = "text_model.embeddings.token_embedding"
        with substitute_output(self.text_model.embeddings.token_embedding, embedded.tokens, name=name):
            output = self.text_model(
                input_ids=ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True
            )
        pooled = self.text_projection(_pooled(output))  # = get_text_features
        words = output.last_hidden_state  # after final_layer_norm
        if attention_mask is not None:
            pad_mask = ~attention_mask.bool()
        else:
            positions = torch.arange(ids.shape[1], device=ids.device)
            pad_mask = positions[None] > self._pool_index(ids)[:, None]
        features: dict[str, Any] = {
            "words": words,
            "pad_mask": pad_mask,
            "levels": [output.hidden_states[i + 1] for i in self.feature_layers],
            "ids": ids,
            "attention_mask": attention_mask,
            "sentence": pooled,
        }
        return Encoded(tokens=self.text_projection(words), global_feature=pooled, features=features)


def towers_from_hf_clip(
    model: nn.Module,
    *,
    image_layers: Sequence[int] = (),
    text_layers: Sequence[int] = (),
    interpolate_pos_encoding: bool = False,
    dense: str | None = None,
) -> tuple[HFCLIPImageTower, HFCLIPTextTower]:
    """Split a ``transformers.CLIPModel`` into ``(image_tower, text_tower)`` sharing its weights.

    Args:
        model: e.g. ``CLIPModel.from_pretrained("openai/clip-vit-base-patch16")``.
        image_layers: vision encoder layers returned as ``features["levels"]`` (e.g. ``(3, 7, 11)``).
        text_layers: text encoder layers returned as ``features["levels"]``.
        interpolate_pos_encoding: pass transformers' option through, for images of another size
            than ``vision_config.image_size``.
        dense: ``"value"`` (MaskCLIP's value path) or ``"clearclip"`` (ClearCLIP's q-q attention)
            scoring features for the patches, ``Encoded.scoring`` ``[B, N, D]``, recomputed from the
            last encoder layer's input with its own weights (``masksd.adapters.clip_dense``); None:
            the plain patch tokens (the paper).
    """
    return (
        HFCLIPImageTower(
            model, feature_layers=image_layers, interpolate_pos_encoding=interpolate_pos_encoding, dense=dense
        ),
        HFCLIPTextTower(model, feature_layers=text_layers),
    )

"""Dense-alignment scoring features for CLIP ViTs, from the last block's input and its own weights.

Why: a CLIP ViT's patch tokens, projected into the joint space, match a sentence *worse* on the
object than on the background (CLIP Surgery's "opposite visualization"; GEM, SCLIP, ClearCLIP).
Image-level contrastive training leaves the last block's q-k attention spatially invariant and
lets the residual stream carry global, label-agnostic features. Training-free fixes recompute
the last block's attention branch differently, and they need only that block's input (which
the forward computes anyway) and its own weights.

``x`` = the input of the last residual attention block ``[B, P + N, W]`` (batch first; ``P``
prefix tokens, CLIP's class token, then ``N`` patches). For the patches:

``"value"`` (MaskCLIP, Zhou et al., ECCV 2022)
    ``ls_1(out_proj(v(ln_1(x))))``: the value projection (the v slice of the packed
    ``attn.in_proj_weight``) and the output projection, with no q-k attention, **no residual and
    no FFN**. MaskCLIP's released ViT code adds both back (``v += x; v = ffn(norm2(v), identity=v)``).
    We leave them out for two reasons. ClearCLIP finds that the residual is the main source of
    noise in the dense map. And the FFN costs ``8 W²`` per token, about one more block, while the
    value path costs ``2 W²``.
``"clearclip"`` (ClearCLIP, Lan et al., ECCV 2024)
    q-q self-attention, ``softmax(q qᵀ / √d_h) v`` per head, with all ``P + N`` tokens as keys,
    then ``out_proj``, again with no residual and no FFN.

The result ``[B, N, W]`` then goes through the visual tower's ``ln_post`` and ``proj``, so it lives
in CLIP's joint space like the sentence feature. Cost: under ``no_grad``, two ``W × W`` matmuls per
patch (value path) or three plus one attention over ``P + N`` keys (ClearCLIP), then ``ln_post`` and
``proj``. That is less than one block of the encoder. See ``benchmarks/dense_cost.py``.

Two ways in:

* towers: ``towers_from_open_clip(clip, dense="value" | "clearclip")`` and
  ``towers_from_hf_clip(model, dense=...)`` (transformers' ``CLIPModel``: the last
  ``CLIPEncoderLayer``'s ``layer_norm1`` and ``self_attn`` q/v/out projections, then
  ``post_layernorm`` and ``visual_projection``) report these features as ``Encoded.scoring``.
  They are computed lazily, only when a scorer reads them. The decoder still gets the plain tokens.
* hooks: ``clip_dense_tap(model, "<path of clip.visual>", mode=...)`` (or the path of a
  transformers ``CLIPModel``) builds a ``Tap`` on the last block's *input*. Its ``project`` chain
  starts with the step ``"clip_dense:<mode>:<P>:<block path>"`` (then ``ln_post`` / ``post_layernorm``
  and the projection), a projection step this module registers with the engine
  (``masksd.engine.plan.register_projection``). Plain strings, so the spec still serialises.

Works for open_clip's ``ResidualAttentionBlock`` (``nn.MultiheadAttention``), its
``CustomResidualAttentionBlock`` without qk-norm, scaled-cosine or head-scale options, OpenAI
CLIP's block, which CRIS uses (same attribute names), and transformers' ``CLIPEncoderLayer``. The
weights are read outside the block's own forward. Under FSDP, compute the features where the block's
parameters are gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from masksd.engine.plan import register_projection
from masksd.spec import Tap

__all__ = [
    "DENSE_MODES", "DenseMode", "check_block", "clip_dense_tap", "dense_block_tokens", "dense_mix",
    "dense_step", "joint_dense_tokens",
]

DenseMode = Literal["value", "clearclip"]
DENSE_MODES: tuple[str, ...] = ("value", "clearclip")
STEP_PREFIX = "clip_dense:"


def check_mode(mode: Any, argument: str) -> None:
    """Refuse anything but ``"value"`` / ``"clearclip"`` (``argument`` names the setting)."""
    if mode not in DENSE_MODES:
        raise ValueError(f"{argument} must be one of {DENSE_MODES} (or None for the plain patch tokens), "
                         f"got {mode!r}")


class _BlockParts(NamedTuple):
    """What the dense features read of one attention block (either library's)."""

    norm: nn.Module  # the pre-attention norm: ln_1 / layer_norm1
    q: Callable[[Tensor], Tensor]  # query projection [.., W] -> [.., W]: a module or F.linear with slices
    v: Callable[[Tensor], Tensor]  # value projection
    out_proj: nn.Module
    heads: int
    scale: float | None  # None: 1 / √d_h
    after: nn.Module  # open_clip's layer scale ls_1, else Identity


def hf_layer_problem(block: nn.Module) -> str | None:
    """What a transformers ``CLIPEncoderLayer`` lacks for dense features (``"lacks layer_norm1"``, ...),
    or None when it has ``layer_norm1`` and ``self_attn`` with ``q_proj`` / ``v_proj`` / ``out_proj``
    (modules: ``nn.Linear``, or adapter layers such as PEFT's LoRA ``Linear``), ``num_heads`` · ``head_dim``
    = the width, and ``scale``."""
    attn = getattr(block, "self_attn", None)
    missing = [] if isinstance(getattr(block, "layer_norm1", None), nn.Module) else ["layer_norm1"]
    missing += [f"self_attn.{name}" for name in ("q_proj", "v_proj", "out_proj")
                if not isinstance(getattr(attn, name, None), nn.Module)]
    missing += [f"self_attn.{name}" for name in ("num_heads", "head_dim")
                if not isinstance(getattr(attn, name, None), int)]
    missing += [] if isinstance(getattr(attn, "scale", None), (int, float)) else ["self_attn.scale"]
    if missing:
        return f"lacks {', '.join(missing)}"
    width = getattr(attn.q_proj, "out_features", None)
    if isinstance(width, int) and attn.num_heads * attn.head_dim != width:
        return (f"has self_attn.num_heads · head_dim = {attn.num_heads} · {attn.head_dim} "
                f"(not the width {width})")
    return None


def _hf_parts(block: nn.Module, where: str) -> _BlockParts:
    """The parts of a transformers ``CLIPEncoderLayer``; a ValueError naming ``where`` if it lacks one."""
    problem = hf_layer_problem(block)
    if problem is not None:
        raise ValueError(f"{where}: dense scoring features need a transformers CLIPEncoderLayer; its "
                         f"{type(block).__name__} {problem}")
    attn = block.self_attn
    return _BlockParts(block.layer_norm1, attn.q_proj, attn.v_proj, attn.out_proj, attn.num_heads,
                       float(attn.scale), nn.Identity())


def _parts(block: nn.Module, where: str) -> _BlockParts:
    """The parts of an open_clip / OpenAI CLIP residual attention block or a transformers
    ``CLIPEncoderLayer``; a ValueError naming ``where`` for anything else."""
    if isinstance(getattr(block, "self_attn", None), nn.Module):
        return _hf_parts(block, where)
    attn = getattr(block, "attn", None)
    ln_1, weight = getattr(block, "ln_1", None), getattr(attn, "in_proj_weight", None)
    out_proj, heads = getattr(attn, "out_proj", None), getattr(attn, "num_heads", None)
    if not isinstance(ln_1, nn.Module) or not isinstance(weight, Tensor) \
            or not isinstance(out_proj, nn.Module) or not isinstance(heads, int):
        raise ValueError(
            f"{where}: dense scoring features need a CLIP residual attention block (ln_1, and attn with a "
            f"packed in_proj_weight, out_proj and num_heads), got {type(block).__name__}; open_clip's and "
            "OpenAI CLIP's ViT blocks and transformers' CLIPEncoderLayer have them"
        )
    if isinstance(getattr(attn, "base_layer", None), nn.Module):  # e.g. PEFT's LoRA MultiheadAttention
        raise ValueError(
            f"{where}: its attention is wrapped by an adapter ({type(attn).__name__}); dense scoring "
            "features read the packed in_proj_weight, which would be the base layer's and miss the adapter. "
            "Score with the plain patch tokens (dense=None / a plain tap), or adapt other layers than the "
            "last block"
        )
    identities = [getattr(attn, "ln_q", None), getattr(attn, "ln_k", None), getattr(attn, "ln_inner", None),
                  getattr(block, "ln_attn", None)]
    if any(m is not None and not isinstance(m, nn.Identity) for m in identities) or \
            getattr(attn, "logit_scale", None) is not None or getattr(attn, "head_scale", None) is not None:
        raise ValueError(
            f"{where}: attention blocks with qk-norm, scaled-cosine attention, head scaling or inner norms "
            "are not supported for dense scoring features"
        )
    width, bias = weight.shape[-1], getattr(attn, "in_proj_bias", None)
    q = partial(F.linear, weight=weight[:width], bias=None if bias is None else bias[:width])
    v = partial(F.linear, weight=weight[2 * width:], bias=None if bias is None else bias[2 * width:])
    return _BlockParts(ln_1, q, v, out_proj, heads, None, getattr(block, "ls_1", nn.Identity()))


def check_block(block: nn.Module, where: str) -> None:
    """Raise a ValueError naming ``where`` unless ``block`` is a supported CLIP attention block."""
    _parts(block, where)


def dense_mix(
    h: Tensor,
    q: Callable[[Tensor], Tensor],
    v: Callable[[Tensor], Tensor],
    heads: int,
    *,
    mode: str,
    prefix_tokens: int = 1,
    scale: float | None = None,
) -> Tensor:
    """The per-head mixing of MaskCLIP's value path or ClearCLIP's q-q attention, before ``out_proj``.

    Shared by the open_clip block (q / v sliced from the packed ``in_proj_weight``) and the Hugging
    Face ``CLIPAttention`` (its ``q_proj`` / ``v_proj``).

    Args:
        h: the block's normalised input ``ln_1(x)`` ``[B, P + N, W]``.
        q, v: the query and value projections ``[.., W] -> [.., W]`` (modules, or ``F.linear`` on
            slices of a packed weight; ``q`` is not called in ``"value"`` mode).
        heads: the number of heads ``H`` (``W = H · d_h``).
        mode: ``"value"`` or ``"clearclip"``.
        prefix_tokens: ``P``; keys in ClearCLIP's attention, not returned.
        scale: the attention's logit scale; None: ``1 / √d_h``.

    Returns:
        ``[B, N, W]``: ``v(h)`` of the patches (``"value"``), or per head
        ``softmax(q_p qᵀ · scale) v`` with the patches' queries ``q_p`` and all ``P + N`` tokens as
        keys, the heads concatenated (``"clearclip"``).
    """
    check_mode(mode, "mode")
    if mode == "value":
        return v(h[:, prefix_tokens:])
    qh, vh = (rearrange(project(h), "b n (heads d) -> b heads n d", heads=heads) for project in (q, v))
    # queries: the patches; keys: every token, q itself (q-q attention)
    attended = F.scaled_dot_product_attention(qh[:, :, prefix_tokens:], qh, vh, scale=scale)
    return rearrange(attended, "b heads n d -> b n (heads d)")


def dense_block_tokens(block: nn.Module, x: Tensor, *, mode: str, prefix_tokens: int = 1) -> Tensor:
    """The attention branch of ``block`` recomputed MaskCLIP's or ClearCLIP's way (module docstring).

    Args:
        block: the last residual attention block of a CLIP ViT.
        x: its input ``[B, P + N, W]`` (batch first).
        mode: ``"value"`` or ``"clearclip"``.
        prefix_tokens: ``P``, the leading tokens that are not patches (CLIP: 1, the class token).
            They are keys in ClearCLIP's attention but not returned.

    Returns:
        ``[B, N, W]``, before ``ln_post`` / ``proj``, in ``x``'s graph (wrap in ``no_grad`` to score).
    """
    check_mode(mode, "mode")
    parts = _parts(block, type(block).__name__)
    with _without_dropout(parts.q, parts.v, parts.out_proj):
        mixed = dense_mix(parts.norm(x), parts.q, parts.v, parts.heads, mode=mode,
                          prefix_tokens=prefix_tokens, scale=parts.scale)
        return parts.after(parts.out_proj(mixed))


@contextmanager
def _without_dropout(*projections: Any) -> Iterator[None]:
    """Run adapter-wrapped projections (modules with children, e.g. a LoRA layer and its
    ``lora_dropout``) in eval mode: a score must not be noisy, nor draw from the RNG the masked
    branches replay. Plain ``nn.Linear`` (no children) is left alone."""
    wrapped = [m for m in projections
               if isinstance(m, nn.Module) and m.training and next(m.children(), None) is not None]
    for module in wrapped:
        module.eval()
    try:
        yield
    finally:
        for module in wrapped:
            module.train()


def joint_dense_tokens(visual: nn.Module, x: Tensor, *, mode: str, prefix_tokens: int = 1) -> Tensor:
    """``dense_block_tokens`` of ``visual.transformer.resblocks[-1]`` on its input ``x [B, P + N, W]``,
    then ``visual.ln_post`` and ``visual.proj``: ``[B, N, D]`` in CLIP's joint space, without gradient."""
    with torch.no_grad():
        tokens = dense_block_tokens(visual.transformer.resblocks[-1], x, mode=mode,
                                    prefix_tokens=prefix_tokens)
        tokens = visual.ln_post(tokens)
        proj = getattr(visual, "proj", None)
        return tokens if proj is None else tokens @ proj.to(tokens.dtype)


def dense_step(mode: str, block: str, prefix_tokens: int = 1) -> str:
    """The ``Tap.project`` step string ``"clip_dense:<mode>:<P>:<block path>"``."""
    check_mode(mode, "mode")
    return f"{STEP_PREFIX}{mode}:{int(prefix_tokens)}:{block}"


def apply_dense_step(model: nn.Module, step: str, value: Tensor) -> Tensor:
    """Evaluate a ``"clip_dense:<mode>:<P>:<block path>"`` step on a tapped block input ``[B, P + N, W]``."""
    try:
        mode, prefix, path = step[len(STEP_PREFIX):].split(":", 2)
        prefix_tokens = int(prefix)
    except ValueError:
        raise ValueError(f"Tap.project step {step!r} must read "
                         "'clip_dense:<mode>:<prefix tokens>:<block path>'") from None
    check_mode(mode, f"Tap.project step {step!r}: mode")
    try:
        block = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"Tap.project step {step!r}: the model has no module {path!r}") from None
    if value.dim() != 3:
        raise ValueError(f"Tap.project step {step!r} needs the block's input [B, P + N, W], "
                         f"got {tuple(value.shape)}")
    return dense_block_tokens(block, value, mode=mode, prefix_tokens=prefix_tokens)


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _has(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a module or a tensor attribute of ``model``."""
    owner, _, name = path.rpartition(".")
    try:
        return isinstance(getattr(model.get_submodule(owner), name, None), (nn.Module, Tensor))
    except AttributeError:
        return False


def clip_dense_tap(
    model: nn.Module, visual: str, *, mode: str = "value", prefix_tokens: int = 1,
    projection: str | None = None,
) -> Tap:
    """A ``Tap`` giving dense-alignment patch features of a CLIP ViT inside a hooked ``model``.

    Args:
        model: the bare model, used to find the ViT's last block.
        visual: path of the CLIP ViT in ``model``: an open_clip / OpenAI CLIP ``VisionTransformer``
            (``transformer.resblocks``, ``ln_post``, ``proj``; e.g. ``"backbone.visual"``), or a
            transformers ``CLIPModel`` / ``CLIPVisionModelWithProjection`` (``vision_model``,
            ``visual_projection``; e.g. ``"backbone.clip"``), or its ``CLIPVisionTransformer``
            (``encoder.layers``, ``post_layernorm``; then name the projection).
        mode: ``"value"`` (MaskCLIP's value path) or ``"clearclip"`` (q-q attention).
        prefix_tokens: leading non-patch tokens of the block's input (CLIP: 1).
        projection: path of the projection into the joint space (a module or a parameter ``[W, D]``);
            None: ``<visual>.proj`` (open_clip, if present) or ``<visual>.visual_projection`` (transformers).

    Returns:
        ``Tap("<last block>", kind="input", select="[0]", project=("clip_dense:<mode>:<P>:<block>",
        "<final norm>", "<projection>"))``, e.g. for open_clip ``<visual>.transformer.resblocks.<last>``,
        ``<visual>.ln_post``, ``<visual>.proj``; for transformers
        ``<visual>.vision_model.encoder.layers.<last>``, ``<visual>.vision_model.post_layernorm``,
        ``<visual>.visual_projection``. Use it as
        ``ModalitySpec(tokens=...)``. The blocks' input must be batch first (open_clip >= 2.32) and
        passed positionally (transformers passes it so).
    """
    check_mode(mode, "mode")
    try:
        tower = model.get_submodule(visual)
    except AttributeError:
        raise ValueError(f"clip_dense_tap: the model has no module {visual!r}") from None
    if isinstance(getattr(tower, "vision_model", None), nn.Module) and hasattr(tower, "visual_projection"):
        projection = _join(visual, "visual_projection") if projection is None else projection
        visual, tower = _join(visual, "vision_model"), tower.vision_model
    resblocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if isinstance(resblocks, (nn.ModuleList, nn.Sequential)) and len(resblocks) and hasattr(tower, "ln_post"):
        blocks, norm = _join(visual, "transformer.resblocks"), _join(visual, "ln_post")
        default = _join(visual, "proj") if getattr(tower, "proj", None) is not None else None
    elif isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) \
            and hasattr(tower, "post_layernorm"):
        blocks, norm, default = _join(visual, "encoder.layers"), _join(visual, "post_layernorm"), None
        if projection is None:
            raise ValueError(
                f"clip_dense_tap: {visual!r} is a transformers CLIP vision transformer, whose projection "
                "into the joint space lives outside it: pass the path of the CLIPModel instead, or "
                "projection='<path of visual_projection>'"
            )
    else:
        raise ValueError(
            f"clip_dense_tap: {visual!r} ({type(tower).__name__}) is not a CLIP ViT (open_clip: "
            "transformer.resblocks, ln_post; transformers: vision_model / encoder.layers, post_layernorm); "
            "dense features need a ViT (ResNet CLIPs: tap layer4 with project=(attnpool.v_proj, "
            "attnpool.c_proj), docs/wrapping.md)"
        )
    projection = default if projection is None else projection
    if projection is not None and not _has(model, projection):
        raise ValueError(f"clip_dense_tap: projection={projection!r} is neither a module nor a tensor "
                         "of the model")
    last = model.get_submodule(blocks)
    block = f"{blocks}.{len(last) - 1}"
    check_block(last[-1], block)
    steps = [dense_step(mode, block, prefix_tokens), norm] + ([] if projection is None else [projection])
    return Tap(block, kind="input", select="[0]", project=tuple(steps))


# steps named "clip_dense:<mode>:<P>:<block>"
register_projection(STEP_PREFIX[:-1], apply_dense_step, differentiable=False)

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
* hooks: ``clip_dense_tap(model, "<path of clip.visual>", mode=...)`` builds a ``Tap`` on the
  last block's *input*. Its ``project`` chain starts with the step
  ``"clip_dense:<mode>:<P>:<block path>"`` (then ``ln_post``, ``proj``), which
  ``masksd.backends.taps.project`` evaluates. Plain strings, so the spec still serialises.

Works for open_clip's ``ResidualAttentionBlock`` (``nn.MultiheadAttention``), its
``CustomResidualAttentionBlock`` without qk-norm, scaled-cosine or head-scale options, and
OpenAI CLIP's block, which CRIS uses (same attribute names). The weights are read outside the
block's own forward. Under FSDP, compute the features where the block's parameters are gathered.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from masksd.spec import Tap

__all__ = [
    "DENSE_MODES", "DenseMode", "check_block", "clip_dense_tap", "dense_block_tokens", "dense_mix", "dense_step",
    "joint_dense_tokens",
]

DenseMode = Literal["value", "clearclip"]
DENSE_MODES: tuple[str, ...] = ("value", "clearclip")
STEP_PREFIX = "clip_dense:"


def check_mode(mode: Any, argument: str) -> None:
    """Refuse anything but ``"value"`` / ``"clearclip"`` (``argument`` names the setting)."""
    if mode not in DENSE_MODES:
        raise ValueError(f"{argument} must be one of {DENSE_MODES} (or None for the plain patch tokens), got {mode!r}")


def _parts(block: nn.Module, where: str) -> tuple[nn.Module, Tensor, Tensor | None, nn.Module, int, nn.Module]:
    """``(ln_1, in_proj_weight [3W, W], in_proj_bias [3W] | None, out_proj, heads, ls_1)`` of a CLIP block."""
    attn = getattr(block, "attn", None)
    ln_1, weight = getattr(block, "ln_1", None), getattr(attn, "in_proj_weight", None)
    out_proj, heads = getattr(attn, "out_proj", None), getattr(attn, "num_heads", None)
    if not isinstance(ln_1, nn.Module) or not isinstance(weight, Tensor) or not isinstance(out_proj, nn.Module) \
            or not isinstance(heads, int):
        raise ValueError(
            f"{where}: dense scoring features need a CLIP residual attention block (ln_1, and attn with a "
            f"packed in_proj_weight, out_proj and num_heads), got {type(block).__name__}; open_clip's and "
            "OpenAI CLIP's ViT blocks have them"
        )
    identities = [getattr(attn, "ln_q", None), getattr(attn, "ln_k", None), getattr(attn, "ln_inner", None),
                  getattr(block, "ln_attn", None)]
    if any(m is not None and not isinstance(m, nn.Identity) for m in identities) or \
            getattr(attn, "logit_scale", None) is not None or getattr(attn, "head_scale", None) is not None:
        raise ValueError(
            f"{where}: attention blocks with qk-norm, scaled-cosine attention, head scaling or inner norms "
            "are not supported for dense scoring features"
        )
    return ln_1, weight, getattr(attn, "in_proj_bias", None), out_proj, heads, getattr(block, "ls_1", nn.Identity())


def check_block(block: nn.Module, where: str) -> None:
    """Raise a ValueError naming ``where`` unless ``block`` is a supported CLIP attention block."""
    _parts(block, where)


def dense_mix(
    h: Tensor,
    q: tuple[Tensor, Tensor | None],
    v: tuple[Tensor, Tensor | None],
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
        q, v: ``(weight [W, W], bias [W] | None)`` of the query and value projections (``q`` is
            not read in ``"value"`` mode).
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
        return F.linear(h[:, prefix_tokens:], *v)
    qh, vh = (rearrange(F.linear(h, *p), "b n (heads d) -> b heads n d", heads=heads) for p in (q, v))
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
    ln_1, weight, bias, out_proj, heads, ls_1 = _parts(block, type(block).__name__)
    width = x.shape[-1]
    q = weight[:width], None if bias is None else bias[:width]
    v = weight[2 * width:], None if bias is None else bias[2 * width:]
    mixed = dense_mix(ln_1(x), q, v, heads, mode=mode, prefix_tokens=prefix_tokens)
    return ls_1(out_proj(mixed))


def joint_dense_tokens(visual: nn.Module, x: Tensor, *, mode: str, prefix_tokens: int = 1) -> Tensor:
    """``dense_block_tokens`` of ``visual.transformer.resblocks[-1]`` on its input ``x [B, P + N, W]``,
    then ``visual.ln_post`` and ``visual.proj``: ``[B, N, D]`` in CLIP's joint space, without gradient."""
    with torch.no_grad():
        tokens = dense_block_tokens(visual.transformer.resblocks[-1], x, mode=mode, prefix_tokens=prefix_tokens)
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
        raise ValueError(f"Tap.project step {step!r} must read 'clip_dense:<mode>:<prefix tokens>:<block path>'") from None
    check_mode(mode, f"Tap.project step {step!r}: mode")
    try:
        block = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"Tap.project step {step!r}: the model has no module {path!r}") from None
    if value.dim() != 3:
        raise ValueError(f"Tap.project step {step!r} needs the block's input [B, P + N, W], got {tuple(value.shape)}")
    return dense_block_tokens(block, value, mode=mode, prefix_tokens=prefix_tokens)


def clip_dense_tap(model: nn.Module, visual: str, *, mode: str = "value", prefix_tokens: int = 1) -> Tap:
    """A ``Tap`` giving dense-alignment patch features of a CLIP ViT inside a hooked ``model``.

    Args:
        model: the bare model, used to find the ViT's last block.
        visual: path of the CLIP ViT in ``model`` (the module with ``transformer.resblocks``,
            ``ln_post`` and ``proj``; e.g. ``"backbone.visual"``).
        mode: ``"value"`` (MaskCLIP's value path) or ``"clearclip"`` (q-q attention).
        prefix_tokens: leading non-patch tokens of the block's input (CLIP: 1).

    Returns:
        ``Tap("<visual>.transformer.resblocks.<last>", kind="input", select="[0]",
        project=("clip_dense:<mode>:<P>:<block>", "<visual>.ln_post", "<visual>.proj"))``. Use it as
        ``ModalitySpec(tokens=...)``. The blocks' input must be batch first (open_clip >= 2.32).
    """
    check_mode(mode, "mode")
    try:
        tower = model.get_submodule(visual)
    except AttributeError:
        raise ValueError(f"clip_dense_tap: the model has no module {visual!r}") from None
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0 or not hasattr(tower, "ln_post"):
        raise ValueError(
            f"clip_dense_tap: {visual!r} ({type(tower).__name__}) is not a CLIP ViT (transformer.resblocks, "
            "ln_post); dense features need a ViT (ResNet CLIPs: tap layer4 with project=(attnpool.v_proj, "
            "attnpool.c_proj), docs/wrapping.md)"
        )
    block = f"{visual}.transformer.resblocks.{len(blocks) - 1}"
    check_block(blocks[-1], block)
    steps = [dense_step(mode, block, prefix_tokens), f"{visual}.ln_post"]
    if getattr(tower, "proj", None) is not None:
        steps.append(f"{visual}.proj")
    return Tap(block, kind="input", select="[0]", project=tuple(steps))

"""Token layouts: the one home of how a tensor of tokens is laid out (after timm's ``layers/format``).

masksd reads every tensor of tokens as ``[B, N, C]`` (``bnc``); a model's embedding or feature
may come as ``bchw`` (a conv stem, ``[B, C, H, W]``), ``nbc`` (``[N, B, C]``, sequence-first
transformers) or ``bcn`` (``[B, C, N]``, a Conv1d's output). These functions convert both ways,
read the 2-D grid of a tensor, and replace masked positions in the model's own layout.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["LAYOUTS", "Layout", "from_bnc", "layout_grid", "replace_in_layout", "to_bnc"]

Layout = Literal["bnc", "bchw", "nbc", "bcn"]
LAYOUTS: tuple[str, ...] = ("bnc", "bchw", "nbc", "bcn")


def to_bnc(value: Tensor, layout: str) -> Tensor:
    """A ``[B, N, C]`` view of ``value`` in ``layout``."""
    if layout == "bchw":
        return rearrange(value, "b c h w -> b (h w) c")
    if layout == "nbc":
        return rearrange(value, "n b c -> b n c")
    if layout == "bcn":
        return rearrange(value, "b c n -> b n c")
    return value


def from_bnc(tokens: Tensor, layout: str, like: Tensor) -> Tensor:
    """``tokens [B, N, C]`` back in ``layout``, shaped as ``like`` (a tensor in that layout)."""
    if layout == "bchw":
        return rearrange(tokens, "b (h w) c -> b c h w", h=like.shape[-2], w=like.shape[-1])
    if layout == "nbc":
        return rearrange(tokens, "b n c -> n b c")
    if layout == "bcn":
        return rearrange(tokens, "b n c -> b c n")
    return tokens


def layout_grid(
    value: Tensor, layout: str, declared: tuple[int, int] | None, *, square: bool
) -> tuple[int, int] | None:
    """The 2-D grid of a token tensor: from a ``bchw`` shape, the ``declared`` grid, or a square
    token count (when ``square``); None for a sequence."""
    if layout == "bchw":
        return (int(value.shape[-2]), int(value.shape[-1]))
    if declared is not None:
        return declared
    count = int(value.shape[{"nbc": 0, "bcn": 2}.get(layout, 1)])
    side = math.isqrt(count)
    return (side, side) if square and side * side == count else None


def replace_in_layout(embedded: Tensor, masked: Tensor, token: Tensor, layout: str) -> Tensor:
    """``embedded`` (in ``layout``) with the ``masked [B, N]`` positions replaced by ``token [C]``,
    in the graph."""
    if layout == "bchw":
        where = rearrange(masked, "b (h w) -> b 1 h w", h=embedded.shape[-2], w=embedded.shape[-1])
    elif layout == "nbc":
        where = rearrange(masked, "b n -> n b 1")
    elif layout == "bcn":
        where = masked[:, None, :]
    else:
        where = masked[..., None]
    shape = {"bchw": (1, -1, 1, 1), "bcn": (1, -1, 1)}.get(layout, (1, 1, -1))
    return torch.where(where, token.to(embedded.dtype).view(shape), embedded)

"""Small helpers of the hook backend: module lookup, value flattening, layouts, widths."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "expand_patterns",
    "flatten_tensors",
    "infer_width",
    "layout_grid",
    "mask_in_layout",
    "resolve_module",
    "to_bnc",
]


def resolve_module(model: nn.Module, path: str, argument: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the spec field."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
        hint = f"; modules with a similar name: {close}" if close else ""
        raise ValueError(
            f"{argument}: the model ({type(model).__name__}) has no module {path!r}{hint}. Paths are "
            "relative to the bare model, as in model.named_modules()"
        ) from None


def expand_patterns(model: nn.Module, patterns: tuple[str, ...], argument: str) -> list[tuple[str, nn.Module]]:
    """Module paths (``fnmatch`` patterns allowed), outermost matches only, in model order."""
    named = dict(model.named_modules())
    chosen: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            hits = [name for name in named if name and fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise ValueError(f"{argument}: pattern {pattern!r} matches no module of the model")
            chosen.extend(hits)
        else:
            resolve_module(model, pattern, argument)
            chosen.append(pattern)
    outer = [p for p in chosen if not any(p != q and p.startswith(q + ".") for q in chosen)]
    order = {name: i for i, name in enumerate(named)}
    return [(p, named[p]) for p in sorted(set(outer), key=order.__getitem__)]


def flatten_tensors(value: Any) -> list[Tensor]:
    """All tensors inside tuples, lists, dicts (incl. HF ``ModelOutput``) and dataclasses."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in flatten_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in flatten_tensors(getattr(value, f.name))]
    return []


def infer_width(module: nn.Module) -> int | None:
    """Channel width of a module's output read off its type, or None when it cannot be told."""
    width = getattr(module, "embed_dim", None)
    if isinstance(width, int) and not isinstance(width, bool):
        return width
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Embedding):
        return int(module.embedding_dim)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return int(module.num_features)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        shape = getattr(module, "normalized_shape", None)
        return int(shape[-1]) if shape else int(module.num_channels)  # type: ignore[union-attr]
    for child in reversed(list(module.children())):
        width = infer_width(child)
        if width is not None:
            return width
    return None


def to_bnc(value: Tensor, layout: str) -> Tensor:
    """A ``[B, N, C]`` view of a tensor in ``layout`` (``bnc``, ``bchw`` or ``nbc``)."""
    if layout == "bchw":
        return rearrange(value, "b c h w -> b (h w) c")
    if layout == "nbc":
        return rearrange(value, "n b c -> b n c")
    return value


def layout_grid(value: Tensor, layout: str, declared: tuple[int, int] | None, *, square: bool) -> tuple[int, int] | None:
    """The 2-D grid of a token tensor: from a ``bchw`` shape, the declared grid, or a square count."""
    if layout == "bchw":
        return (int(value.shape[-2]), int(value.shape[-1]))
    if declared is not None:
        return declared
    count = int(value.shape[0] if layout == "nbc" else value.shape[1])
    side = math.isqrt(count)
    return (side, side) if square and side * side == count else None


def mask_in_layout(masked: Tensor, layout: str, grid: tuple[int, int] | None) -> Tensor:
    """``masked [B, N]`` reshaped to broadcast against a tensor in ``layout``."""
    if layout == "bchw":
        assert grid is not None
        return rearrange(masked, "b (h w) -> b 1 h w", h=grid[0], w=grid[1])
    if layout == "nbc":
        return rearrange(masked, "b n -> n b 1")
    return masked[..., None]


def replace_in_layout(
    embedded: Tensor, masked: Tensor, token: Tensor, layout: str, grid: tuple[int, int] | None
) -> Tensor:
    """``embedded`` with ``masked`` positions replaced by ``token [C]`` (kept in the graph)."""
    where = mask_in_layout(masked, layout, grid)
    shape = (1, -1, 1, 1) if layout == "bchw" else (1, 1, -1)
    return torch.where(where, token.to(embedded.dtype).view(shape), embedded)

"""Correlation filtering and guided token masking: pure, batched tensor ops.

The pipeline of one masked branch (paper Eqs. 3-4 and 6-7)::

    scores = correlation_scores(global_feature, tokens)            # [B, N]
    kept   = select_top_k(scores, valid, top_k=0.5)                 # [B, N] bool
    masked = sample_mask(kept, ratio=0.25, generator=g)             # [B, N] bool, masked ⊆ kept
    tokens = replace_tokens(embedded, masked, mask_token)           # [B, N, C]

Count rules (per sample, ``n`` = number of valid tokens), chosen so that fractional counts are
not silently floored to zero on short sentences (DESIGN.md §2, docs/decisions.md):

* kept ``T = max(1, floor(top_k * n + 1/2))`` when ``n > 0``, else 0 (round half up, at least
  one token). ``top_k == 1`` keeps every valid token.
* masked ``m = floor(ratio * T) + Bernoulli(frac(ratio * T))``: stochastic rounding, so that
  ``E[m] = ratio * T`` exactly. ``ratio == 0`` masks nothing; ``ratio == 1`` masks every kept
  token.

No Python loop runs over the batch; all randomness comes from the optional ``generator``.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "correlation_scores",
    "kept_counts",
    "masked_counts",
    "select_top_k",
    "sample_mask",
    "replace_tokens",
    "expand_mask",
    "nearest_units",
    "shrink_mask",
]

Metric = Literal["dot", "cosine"]


def _check_fraction(value: object, name: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_bool_mask(mask: object, name: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape [B, N], got {tuple(mask.shape)}")
    return mask


def correlation_scores(
    global_feature: Tensor, tokens: Tensor, *, metric: Metric = "dot"
) -> Tensor:
    """Score every token against the other modality's global feature.

    Args:
        global_feature: ``[B, D]``, e.g. the sentence feature ``w_global``.
        tokens: ``[B, N, D]``, e.g. the visual tokens ``V_local``.
        metric: ``"dot"`` (the paper's ``p_i = w_global · v_i``) or ``"cosine"``.

    Returns:
        ``[B, N]`` float32 scores (computed in float32 whatever the input dtype; no gradient is
        meant to flow through them since top-K selection is not differentiable).
    """
    if not isinstance(global_feature, Tensor) or global_feature.dim() != 2:
        raise ValueError(
            "global_feature must be a [B, D] tensor, got "
            f"{tuple(global_feature.shape) if isinstance(global_feature, Tensor) else global_feature!r}"
        )
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError(
            "tokens must be a [B, N, D] tensor, got "
            f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else tokens!r}"
        )
    if global_feature.shape[0] != tokens.shape[0] or global_feature.shape[1] != tokens.shape[2]:
        raise ValueError(
            f"global_feature [B, D] = {tuple(global_feature.shape)} does not match tokens "
            f"[B, N, D] = {tuple(tokens.shape)}: batch size and feature width D must agree (both "
            "must live in one space, e.g. CLIP's joint embedding)"
        )
    if not (global_feature.is_floating_point() and tokens.is_floating_point()):
        raise TypeError("global_feature and tokens must be floating-point tensors")
    if metric not in ("dot", "cosine"):
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
    # Autocast would run the einsum (a bmm) in bf16/fp16 again: keep the scores in float32, or
    # near-equal scores collapse into ties and top-K favours the lower indices.
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        query = global_feature.float()
        keys = tokens.float()
        if metric == "cosine":
            query = torch.nn.functional.normalize(query, dim=-1)
            keys = torch.nn.functional.normalize(keys, dim=-1)
        return torch.einsum("bd,bnd->bn", query, keys)


def kept_counts(valid_counts: Tensor, top_k: float) -> Tensor:
    """Tokens kept by correlation filtering: ``max(1, floor(top_k * n + 1/2))``, 0 if ``n == 0``.

    Args:
        valid_counts: ``[B]`` integer number of valid tokens per sample.
        top_k: fraction in (0, 1].

    Returns:
        ``[B]`` int64 counts, each in ``[min(1, n), n]``.
    """
    top_k = _check_fraction(top_k, "top_k", allow_zero=False)
    counts = valid_counts.to(torch.int64)
    if top_k == 1.0:
        return counts
    kept = torch.floor(counts.to(torch.float64) * top_k + 0.5).to(torch.int64)
    return torch.minimum(kept.clamp(min=1), counts)


def masked_counts(
    kept: Tensor, ratio: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Tokens to mask among ``kept`` per sample, stochastically rounded (unbiased).

    Args:
        kept: ``[B]`` int64 kept counts ``T``.
        ratio: masking ratio α in [0, 1].
        generator: source of randomness (on ``kept``'s device).

    Returns:
        ``[B]`` int64 ``m`` with ``E[m] = ratio * T`` and ``floor(ratio*T) <= m <= ceil(ratio*T)``.
    """
    ratio = _check_fraction(ratio, "ratio", allow_zero=True)
    if ratio == 0.0:
        return torch.zeros_like(kept, dtype=torch.int64)
    expected = kept.to(torch.float64) * ratio
    base = torch.floor(expected)
    fraction = expected - base
    draw = torch.rand(kept.shape, generator=generator, device=kept.device, dtype=torch.float64)
    return (base + (draw < fraction).to(torch.float64)).to(torch.int64)


def _ranks(keys: Tensor) -> Tensor:
    """Rank of every entry along dim 1 when sorted ascending (stable), ``[B, N]`` int64."""
    order = torch.argsort(keys, dim=1, stable=True)
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def select_top_k(scores: Tensor, valid: Tensor, *, top_k: float) -> Tensor:
    """Correlation filtering: per sample, keep the ``top_k`` fraction of valid tokens by score.

    Args:
        scores: ``[B, N]`` floating scores (higher = more correlated).
        valid: ``[B, N]`` bool; invalid tokens (padding, special tokens) are never kept.
        top_k: fraction in (0, 1]; the count rule is ``kept_counts``.

    Returns:
        ``[B, N]`` bool ``kept`` with ``kept ⊆ valid`` and ``kept.sum(1) == kept_counts(...)``.
        Ties are broken towards the lower index.
    """
    _check_bool_mask(valid, "valid")
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point tensor")
    if scores.shape != valid.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must have the same "
            "[B, N] shape"
        )
    counts = kept_counts(valid.sum(dim=1), top_k)
    if top_k == 1.0:
        return valid.clone()
    # Descending order by score with invalid tokens last: rank on (-score), invalid = +inf.
    keys = torch.where(valid, -scores.float(), torch.full_like(scores, float("inf"), dtype=torch.float32))
    keys = torch.nan_to_num(keys, nan=float("inf"))
    return (_ranks(keys) < counts[:, None]) & valid


def sample_mask(
    kept: Tensor, *, ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """Guided random masking: per sample, mask a random ``ratio`` fraction of the kept tokens.

    Args:
        kept: ``[B, N]`` bool tokens eligible for masking (output of ``select_top_k``).
        ratio: α in [0, 1]; counts follow ``masked_counts`` (stochastic rounding).
        generator: a ``torch.Generator`` on ``kept``'s device for reproducible draws.

    Returns:
        ``[B, N]`` bool ``masked ⊆ kept``.
    """
    _check_bool_mask(kept, "kept")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    counts = masked_counts(kept.sum(dim=1), ratio, generator=generator)
    if ratio == 0.0:
        return torch.zeros_like(kept)
    draws = torch.rand(kept.shape, generator=generator, device=kept.device)
    keys = torch.where(kept, draws, torch.full_like(draws, 2.0))
    return (_ranks(keys) < counts[:, None]) & kept


def replace_tokens(tokens: Tensor, masked: Tensor, mask_token: Tensor) -> Tensor:
    """Replace the ``masked`` tokens by ``mask_token`` (differentiable w.r.t. both).

    Args:
        tokens: ``[B, N, C]`` embedded tokens.
        masked: ``[B, N]`` bool.
        mask_token: ``[C]`` learnable token, broadcast to every masked position.

    Returns:
        ``[B, N, C]`` in ``tokens``' dtype. The mask token always stays in the autograd graph
        (it receives a zero gradient when nothing is masked), so DDP sees it used every step.
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError("tokens must be a [B, N, C] tensor")
    _check_bool_mask(masked, "masked")
    if tuple(masked.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"masked {tuple(masked.shape)} must match tokens' [B, N] = {tuple(tokens.shape[:2])}"
        )
    if not isinstance(mask_token, Tensor) or tuple(mask_token.shape) != (tokens.shape[2],):
        raise ValueError(
            f"mask_token must have shape [C] = ({tokens.shape[2]},), got "
            f"{tuple(mask_token.shape) if isinstance(mask_token, Tensor) else mask_token!r}"
        )
    return torch.where(masked[..., None], mask_token.to(tokens.dtype), tokens)


def nearest_units(
    grid: tuple[int, int], unit_grid: tuple[int, int], device: torch.device | None = None
) -> Tensor:
    """The unit each fine position is nearest-assigned to: ``[h * w]`` int64 indices into the
    ``h_u * w_u`` units (row-major).

    Fine row ``i`` belongs to unit row ``floor(i * h_u / h)`` (the ``nearest`` convention of
    ``F.interpolate``, computed in exact integer arithmetic), columns alike. Each unit's fine
    positions therefore form one solid rectangle of ``floor(h/h_u)`` or ``ceil(h/h_u)`` rows by
    ``floor(w/w_u)`` or ``ceil(w/w_u)`` columns, and these rectangles tile the fine grid, at any
    (also non-integer) ratio.
    """
    (h, w), (h_u, w_u) = tuple(grid), tuple(unit_grid)
    rows = torch.div(torch.arange(h, device=device) * h_u, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w, device=device) * w_u, w, rounding_mode="floor")
    return rearrange(rows[:, None] * w_u + cols[None, :], "h w -> (h w)")


def _check_grid_mask(mask: Tensor, grid: tuple[int, int], name: str, grid_name: str) -> None:
    _check_bool_mask(mask, name)
    if len(tuple(grid)) != 2 or mask.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"{name} has {mask.shape[1]} positions but {grid_name} {tuple(grid)} holds "
            f"{grid[0] * grid[1] if len(tuple(grid)) == 2 else '?'}; pass the (h, w) grid the mask lies on"
        )


def expand_mask(unit_mask: Tensor, unit_grid: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Expand a mask over coarse units onto a finer grid (nearest; any ratio).

    A masked unit becomes a solid block of fine positions (ConvNeXt V2 / SparK), so a CNN stem
    cannot fill it back in from its neighbours; the blocks tile the fine grid (see
    ``nearest_units``).

    Args:
        unit_mask: ``[B, h_u * w_u]`` bool.
        unit_grid: ``(h_u, w_u)``.
        grid: ``(h, w)`` of the fine grid.

    Returns:
        ``[B, h * w]`` bool: ``out[:, p] = unit_mask[:, nearest_units(grid, unit_grid)[p]]``.
    """
    _check_grid_mask(unit_mask, unit_grid, "unit_mask", "unit_grid")
    if tuple(unit_grid) == tuple(grid):
        return unit_mask
    return unit_mask[:, nearest_units(grid, unit_grid, unit_mask.device)]


def shrink_mask(mask: Tensor, grid: tuple[int, int], unit_grid: tuple[int, int]) -> Tensor:
    """The exact inverse mapping of ``expand_mask``: ``[B, h * w]`` → ``[B, h_u * w_u]``.

    A unit is maskable when *any* of the fine positions that ``expand_mask`` assigns to it is
    maskable (the engine then masks ``expand_mask(units) & mask``, so a selected unit always
    masks at least one position). A unit that no fine position is assigned to (a fine grid
    smaller than the unit grid) is never maskable.

    Args:
        mask: ``[B, h * w]`` bool over the fine grid.
        grid: ``(h, w)``.
        unit_grid: ``(h_u, w_u)``.

    Returns:
        ``[B, h_u * w_u]`` bool.
    """
    _check_grid_mask(mask, grid, "mask", "grid")
    if tuple(unit_grid) == tuple(grid):
        return mask
    units = nearest_units(grid, unit_grid, mask.device)
    hits = torch.zeros(mask.shape[0], unit_grid[0] * unit_grid[1], dtype=torch.int64, device=mask.device)
    return hits.index_add_(1, units, mask.to(torch.int64)) > 0

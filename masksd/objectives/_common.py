"""Helpers shared by the auxiliary objectives (validation, grids, targets, positions)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from masksd.towers import Encoded

if TYPE_CHECKING:
    from masksd.engine.runner import Runner
    from masksd.step import Step

__all__ = [
    "autocast_off",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_width",
    "grid_of",
    "sine_positions",
    "target_on_grid",
    "text_padding",
    "trailing_padding",
]


def check_fraction(
    value: Any, name: str, *, low: float = 0.0, high: float | None = 1.0, open_low: bool = False
) -> None:
    """``value`` must be a real number in ``[low, high]`` (``(low, high]`` when ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    too_low = value <= low if open_low else value < low
    if too_low or (high is not None and value > high) or not math.isfinite(value):
        interval = ("(" if open_low else "[") + f"{low}, " + (f"{high}]" if high is not None else "inf)")
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def check_int(value: Any, name: str, *, minimum: int) -> None:
    """``value`` must be an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_width(tensor: Tensor, expected: int, what: str, argument: str) -> None:
    """The last dimension of ``tensor`` must be ``expected`` (the width given at construction)."""
    if tensor.shape[-1] != expected:
        raise ValueError(
            f"{what} have width {tensor.shape[-1]} (shape {tuple(tensor.shape)}) but the objective was built "
            f"with {argument}={expected}; pass {argument}={tensor.shape[-1]}"
        )


def autocast_off(tensor: Tensor) -> torch.autocast:
    """Disable autocast on ``tensor``'s device (losses run in float32, as ``masksd.losses``)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def grid_of(encoded: Encoded, embedded_grid: tuple[int, int] | None) -> tuple[int, int] | None:
    """The 2-D grid of ``encoded.tokens``: its own, the embedded grid when the counts match, a square
    count, else None."""
    count = int(encoded.tokens.shape[1])
    if encoded.grid is not None:
        return encoded.grid
    if embedded_grid is not None and embedded_grid[0] * embedded_grid[1] == count:
        return embedded_grid
    side = math.isqrt(count)
    return (side, side) if side * side == count else None


def target_on_grid(target: Tensor, grid: tuple[int, int]) -> Tensor:
    """Foreground fraction of every grid cell: ``[B, H, W]`` (or ``[B, 1, H, W]``) → ``[B, h*w]``
    float32 (area average, ``adaptive_avg_pool2d``)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"target must have shape [B, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
    with autocast_off(target):
        pooled = F.adaptive_avg_pool2d(target.float()[:, None], grid)
    return rearrange(pooled, "b 1 h w -> b (h w)")


def sine_positions(grid: tuple[int, int], width: int, device: torch.device) -> Tensor:
    """Fixed 2-D sine-cosine embedding of the cell centres ``((x + ½)/w, (y + ½)/h)``, ``[h*w, width]``:
    a quarter of the channels per sin/cos of x/y (frequencies from 1 cycle per image to the grid's
    Nyquist limit, geometric); the ``width % 4`` remaining channels are zero."""
    h, w = grid
    quarter = width // 4
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    # geometric frequencies from 1 cycle per image to the grid's Nyquist limit
    nyquist = max(h, w, 2) / 2.0
    steps = torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter - 1, 1)
    frequencies = 2.0 * math.pi * nyquist**steps
    parts = []
    for coordinate in (xx.flatten(), yy.flatten()):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=1)
    return F.pad(out, (0, width - out.shape[1]))


def trailing_padding(ids: Tensor, maskable: Tensor) -> Tensor:
    """Padding of right-padded token ids: per row, the trailing run of non-maskable positions that
    repeat the row's last id.

    Args:
        ids: ``[B, L]`` token ids.
        maskable: ``[B, L]`` bool (False for padding and special tokens).

    Returns:
        ``[B, L]`` bool, True = padding. Every trailing pad token is included; a sentence that fills
        the whole context and ends with a special token (EOT) has that token counted as padding too,
        so the rule may hide one real token but never lets padding through.
    """
    if ids.shape != maskable.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and maskable {tuple(maskable.shape)} must both be [B, L]")
    repeats_last = (ids == ids[:, -1:]) & ~maskable
    return repeats_last.flip(1).int().cumprod(dim=1).flip(1).bool()


def text_padding(step: Step, runner: Runner, *encoded: Encoded | None) -> Tensor:
    """The text's padding ``[B, L]`` bool (True = padding), lined up with the step's embedded words.

    Taken from the first of ``encoded`` (then the step's text features) whose ``features["pad_mask"]``
    is a ``[B, L]`` bool tensor (the open_clip and HF CLIP adapters set it); otherwise derived from
    the token ids (``runner.token_ids``; hooks: ``HookSpec.text.maskable.ids``) with
    :func:`trailing_padding`.

    Raises:
        TypeError: neither a pad mask nor token ids are available (the message names both).
    """
    maskable = step.embedded("text").maskable
    for source in (*encoded, step.encoded("text")):
        pad = (source.features.get("pad_mask") if source is not None and isinstance(source.features, dict)
               else None)
        if isinstance(pad, Tensor) and pad.dtype == torch.bool and pad.shape == maskable.shape:
            return pad.to(maskable.device)
    try:
        ids = runner.token_ids(step)
    except TypeError as error:
        raise TypeError(
            "the text's padding is needed but unknown: give Encoded.features['pad_mask'] [B, L] bool "
            f"from the text tower, or token ids ({error})"
        ) from error
    return trailing_padding(ids, maskable)

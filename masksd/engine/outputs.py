"""Reading what a model gives back: its logits, its token ids, its own training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_tensor_loss", "check_ids", "check_logits"]


def check_logits(logits: Any, *, two_class: bool, where: str) -> Tensor:
    """Turn ``logits`` into ``[B, 1, h, w]``; two-class ``[B, 2, h, w]`` become ``x1 - x0``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"{where} must give floating-point segmentation logits, got {type(logits).__name__}"
            + (f" of dtype {logits.dtype}" if isinstance(logits, Tensor) else "")
            + "; point HookSpec.logits at the tensor (e.g. Output(select='[0]') or Tap('<module>'))"
        )
    if two_class:
        if logits.dim() != 4 or logits.shape[1] != 2:
            raise ValueError(f"{where}: two_class=True needs logits [B, 2, h, w], got {tuple(logits.shape)}")
        return (logits[:, 1] - logits[:, 0])[:, None]
    if logits.dim() == 3:
        return logits[:, None]
    if logits.dim() == 4 and logits.shape[1] == 1:
        return logits
    if logits.dim() == 4 and logits.shape[1] == 2:
        raise ValueError(
            f"{where} gives two-class logits {tuple(logits.shape)}; set HookSpec(two_class=True) so "
            "that masksd uses x[:, 1] - x[:, 0]"
        )
    raise ValueError(f"{where} must give logits [B, 1, h, w] or [B, h, w], got {tuple(logits.shape)}")


def check_ids(ids: Any, maskable: Tensor, where: str) -> Tensor:
    """Token ids as an int64 ``[B, L]`` tensor lined up with the embedded words' ``maskable``."""
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        found = f"{ids.dtype} tensor" if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{where} must give integer token ids [B, L], got a {found}")
    if tuple(ids.shape) != tuple(maskable.shape):
        raise ValueError(
            f"{where} gives token ids of shape {tuple(ids.shape)} but the embedded words are "
            f"{tuple(maskable.shape)}; the ids must line up with the embedded tokens one to one"
        )
    return ids.to(device=maskable.device, dtype=torch.int64)


def _loss_terms(value: Any, counted: bool, key: str, found: list[str]) -> list[Tensor]:
    """The tensors of ``value`` that count as loss terms (``as_tensor_loss``'s rule), each
    averaged to a scalar; ``found`` collects the key paths seen (for the error message)."""
    if isinstance(value, Tensor):
        found.append(key)
        return [value.float().mean()] if counted else []
    if isinstance(value, Mapping):
        named = any("loss" in str(k) for k in value)
        return [
            term
            for k, v in value.items()
            for term in _loss_terms(v, "loss" in str(k) or (counted and not named), f"{key}[{k!r}]", found)
        ]
    if isinstance(value, (list, tuple)):
        return [term for i, v in enumerate(value) for term in _loss_terms(v, counted, f"{key}[{i}]", found)]
    return []


def as_tensor_loss(value: Any, where: str) -> Tensor:
    """The model's own training loss as a float32 scalar ``[]``.

    ``value`` is a scalar tensor, or a dict of loss terms read with mmseg's ``parse_losses``
    convention: only entries whose key contains ``"loss"`` count (``loss_ce``, ``aux.loss_dice``),
    the rest (``acc_seg``, ``pred``, ...) are metrics or outputs and are ignored. A counted entry
    may be a tensor (averaged to a scalar, as mmseg does) or a list/tuple/dict of tensors, summed;
    a nested dict is read with the same rule, except that under a counted key a dict none of whose
    keys says ``"loss"`` counts whole (``{"loss": {"ce": a, "dice": b}}`` gives ``a + b``). Dicts
    under other keys are searched too (``{"decode": {"loss_ce": a, "acc_seg": m}}`` gives ``a``).

    Raises:
        ValueError: no key of a dict names a loss (the message lists the keys found), or the
            value is neither a scalar tensor nor a dict.
    """
    if isinstance(value, Mapping):
        found: list[str] = []
        terms = _loss_terms(value, False, "", found)
        if not terms:
            raise ValueError(
                f"{where} selects a dict with no loss entry: a key must contain 'loss' (mmseg's "
                "convention; metrics such as 'acc_seg' are ignored), found tensors at "
                f"{found or list(value)}; rename the model's loss key or point the selector at the loss "
                "itself (e.g. HookSpec(loss=\"['losses']['loss_ce']\"))"
            )
        value = torch.stack(terms).sum()
    if not isinstance(value, Tensor) or value.numel() != 1:
        found_what = (
            f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        )
        raise ValueError(
            f"{where} must give a scalar loss tensor or a dict of loss terms, got {found_what}; "
            "point HookSpec.loss at the model's training loss (e.g. \"[2]\" or \"['loss']\")"
        )
    return value.reshape(()).float()

"""Referring image segmentation (RIS) metrics.

All functions take *binary* masks: ``bool`` tensors, or integer/float tensors whose values
are only 0 and 1. Turning a model's output into a binary mask (sigmoid, threshold, resizing
back to the evaluation resolution) is the caller's job.

Metrics (all returned as **fractions in [0, 1]**; multiply by 100 for the usual tables):

* ``miou``  -- mean over samples (sentences) of the per-sample IoU ``I_i / U_i``.
* ``oiou``  -- overall IoU, ``sum_i I_i / sum_i U_i`` (cumulative intersection over cumulative
  union). It weights large objects more than ``miou`` does.
* ``prec@X`` -- fraction of samples whose IoU passes threshold ``X`` (default thresholds
  0.5, 0.6, 0.7, 0.8, 0.9).

Conventions differ between the reference codebases; :class:`RISMetrics` exposes them as
options so that numbers can be reproduced:

* **LAVT / MagNet** (the default here): Prec@X counts ``IoU >= X``; reports mIoU and oIoU;
  evaluates at the 480x480 network resolution (not the original image size); a sample whose
  prediction and target are both empty (union 0) gets IoU 0 (``empty_union_iou=0.0``).
* **CRIS**: reports mIoU only; Prec@X counts ``IoU > X`` (use ``prec_compare=">"``);
  the sigmoid map is warped back to the *original* image size and thresholded at 0.35 before
  the IoU is computed (pass per-sample masks of differing sizes as a list to
  :meth:`RISMetrics.update`).

Distributed evaluation: every rank accumulates its own shard, then :meth:`RISMetrics.all_reduce`
sums the accumulators (float64) across ``torch.distributed`` ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["RISMetrics", "intersection_union", "mask_iou"]

DEFAULT_PREC_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def _as_bool(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Convert a binary mask (bool or 0/1 values) to a bool tensor, validating it."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or np.ndarray, got {type(x).__name__}")
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise TypeError(f"{name} must be bool or real-valued 0/1, got dtype {x.dtype}")
    if x.numel() and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(
            f"{name} must be a binary mask (bool or values in {{0, 1}}); "
            "threshold probabilities/logits before computing metrics"
        )
    return x != 0


def _check_pair(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batched pair and return bool tensors ``[B, H, W]`` on the same device."""
    p = _as_bool(pred, "pred")
    t = _as_bool(target, "target")
    if p.ndim == 2:
        p = p.unsqueeze(0)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if p.ndim != 3:
        raise ValueError(f"pred must have shape [B, H, W] or [H, W], got {tuple(pred.shape)}")
    if t.ndim != 3:
        raise ValueError(f"target must have shape [B, H, W] or [H, W], got {tuple(target.shape)}")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: pred {tuple(p.shape)} vs target {tuple(t.shape)}")
    if p.device != t.device:
        t = t.to(p.device)
    return p, t


def intersection_union(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample intersection and union pixel counts.

    Args:
        pred: binary predicted masks ``[B, H, W]`` (or a single ``[H, W]`` mask, treated as B=1).
        target: binary ground-truth masks, same shape as ``pred``.

    Returns:
        ``(I, U)``, two float64 tensors of shape ``[B]`` on ``pred``'s device.
    """
    p, t = _check_pair(pred, target)
    inter = (p & t).flatten(1).sum(1, dtype=torch.float64)
    union = (p | t).flatten(1).sum(1, dtype=torch.float64)
    return inter, union


def mask_iou(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    *,
    empty_union_iou: float = 0.0,
) -> torch.Tensor:
    """Per-sample IoU of binary masks.

    Args:
        pred: binary predicted masks ``[B, H, W]`` (or ``[H, W]``).
        target: binary ground-truth masks, same shape.
        empty_union_iou: IoU given to a sample whose union is 0 (both masks empty).
            LAVT uses 0; 1 is the other common choice.

    Returns:
        float64 tensor ``[B]`` with values in [0, 1].
    """
    inter, union = intersection_union(pred, target)
    iou = inter / union.clamp_min(1.0)
    return torch.where(union > 0, iou, torch.full_like(iou, float(empty_union_iou)))


class RISMetrics:
    """Accumulator for mIoU, oIoU and Prec@X over a (possibly distributed) evaluation.

    Usage::

        m = RISMetrics()
        for pred, target in loader:      # bool [B,H,W], or lists of [H_i,W_i]
            m.update(pred, target)
        m.all_reduce()                   # no-op unless torch.distributed is initialised
        m.compute()  # {'miou':..., 'oiou':..., 'prec@0.5':..., ..., 'count': N}

    Keyword Args:
        prec_thresholds: IoU thresholds for Prec@X (each in [0, 1]).
        prec_compare: ``">="`` (LAVT, default) or ``">"`` (CRIS).
        empty_union_iou: IoU of a sample whose prediction and target are both empty
            (LAVT: 0.0). Such samples add 0 to both cumulative I and U.
    """

    def __init__(
        self,
        *,
        prec_thresholds: Sequence[float] = DEFAULT_PREC_THRESHOLDS,
        prec_compare: str = ">=",
        empty_union_iou: float = 0.0,
    ) -> None:
        if prec_compare not in (">=", ">"):
            raise ValueError(f"prec_compare must be '>=' or '>', got {prec_compare!r}")
        thresholds = tuple(float(x) for x in prec_thresholds)
        if any(not 0.0 <= x <= 1.0 for x in thresholds):
            raise ValueError(f"prec_thresholds must lie in [0, 1], got {thresholds}")
        if len(set(thresholds)) != len(thresholds):
            raise ValueError(f"prec_thresholds must be distinct, got {thresholds}")
        if not 0.0 <= float(empty_union_iou) <= 1.0:
            raise ValueError(f"empty_union_iou must lie in [0, 1], got {empty_union_iou}")
        self.prec_thresholds = thresholds
        self.prec_compare = prec_compare
        self.empty_union_iou = float(empty_union_iou)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Zero all accumulators."""
        self.iou_sum = 0.0
        self.count = 0
        self.cum_i = 0.0
        self.cum_u = 0.0
        self.prec_hits = [0] * len(self.prec_thresholds)

    def _state_vector(self) -> torch.Tensor:
        """Accumulators packed as float64 ``[4 + K]``: iou_sum, count, cum_i, cum_u, hits."""
        vals = [self.iou_sum, float(self.count), self.cum_i, self.cum_u]
        vals += [float(h) for h in self.prec_hits]
        return torch.tensor(vals, dtype=torch.float64)

    def _load_state_vector(self, vec: torch.Tensor) -> None:
        v = vec.detach().to("cpu", torch.float64).tolist()
        self.iou_sum, count, self.cum_i, self.cum_u = v[:4]
        self.count = int(round(count))
        self.prec_hits = [int(round(h)) for h in v[4:]]

    # ----------------------------------------------------------------- update
    def _accumulate(self, inter: torch.Tensor, union: torch.Tensor) -> None:
        iou = inter / union.clamp_min(1.0)
        iou = torch.where(union > 0, iou, torch.full_like(iou, self.empty_union_iou))
        self.iou_sum += float(iou.sum())
        self.count += int(iou.numel())
        self.cum_i += float(inter.sum())
        self.cum_u += float(union.sum())
        for k, thr in enumerate(self.prec_thresholds):
            hit = iou >= thr if self.prec_compare == ">=" else iou > thr
            self.prec_hits[k] += int(hit.sum())

    def update(
        self,
        pred: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
        target: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    ) -> torch.Tensor:
        """Add a batch of samples.

        Args:
            pred: binary predictions, either a batch ``[B, H, W]`` (or one ``[H, W]`` mask)
                or a list/tuple of per-sample ``[H_i, W_i]`` masks (sizes may differ, e.g.
                evaluation at each image's original size).
            target: ground truth in the same layout as ``pred``.

        Returns:
            The per-sample IoUs of this batch, float64 ``[B]`` (on CPU).
        """
        if isinstance(pred, (list, tuple)) != isinstance(target, (list, tuple)):
            raise TypeError(
                "pred and target must both be batched tensors or both be lists of masks, got "
                f"{type(pred).__name__} and {type(target).__name__}"
            )
        if isinstance(pred, (list, tuple)):
            if len(pred) != len(target):
                raise ValueError(f"pred and target lists differ in length: {len(pred)} vs {len(target)}")
            inters, unions = [], []
            for i, (p, t) in enumerate(zip(pred, target, strict=True)):
                if getattr(p, "ndim", None) != 2 or getattr(t, "ndim", None) != 2:
                    raise ValueError(
                        f"list element {i}: pred and target must be [H, W] masks, got "
                        f"{tuple(getattr(p, 'shape', ()))} and {tuple(getattr(t, 'shape', ()))}"
                    )
                inter, union = intersection_union(p, t)  # counted where the masks are
                inters.append(inter)
                unions.append(union)
            if not inters:
                return torch.zeros(0, dtype=torch.float64)
            at = inters[0].device  # one device→host read per batch, not per sample
            inter_t = torch.cat([x.to(at) for x in inters]).cpu()
            union_t = torch.cat([x.to(at) for x in unions]).cpu()
        else:
            inter_t, union_t = intersection_union(pred, target)
            inter_t, union_t = inter_t.cpu(), union_t.cpu()
        self._accumulate(inter_t, union_t)
        iou = inter_t / union_t.clamp_min(1.0)
        return torch.where(union_t > 0, iou, torch.full_like(iou, self.empty_union_iou))

    # ---------------------------------------------------------------- results
    def compute(self) -> dict[str, float]:
        """Current metrics as fractions in [0, 1].

        Returns:
            ``{'miou', 'oiou', 'prec@0.5', ..., 'count'}``. With no samples the rates are NaN;
            ``oiou`` is NaN when the cumulative union is 0.
        """
        n = self.count
        out: dict[str, float] = {
            "miou": self.iou_sum / n if n else math.nan,
            "oiou": self.cum_i / self.cum_u if self.cum_u > 0 else math.nan,
        }
        for thr, hits in zip(self.prec_thresholds, self.prec_hits, strict=True):
            out[f"prec@{thr:g}"] = hits / n if n else math.nan
        out["count"] = float(n)
        return out

    # ------------------------------------------------------------ distributed
    def all_reduce(
        self, group: object | None = None, *, device: torch.device | str | None = None
    ) -> RISMetrics:
        """Sum the accumulators over all ranks of ``group`` in place (float64).

        A no-op when ``torch.distributed`` is unavailable or not initialised. Call it exactly
        once, after the last :meth:`update` (calling twice double-counts); use :meth:`sync`
        for a non-mutating variant.

        Args:
            group: process group (default: the world).
            device: device of the communication tensor. Default: the current CUDA device
                when the backend is NCCL, else CPU.

        Returns:
            ``self``.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if device is None:
            backend = str(dist.get_backend(group)).lower()
            if "nccl" in backend:
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = torch.device("cpu")
        vec = self._state_vector().to(device)
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
        self._load_state_vector(vec)
        return self

    def sync(
        self, group: object | None = None, *, device: torch.device | str | None = None
    ) -> dict[str, float]:
        """Metrics summed over all ranks, without changing this accumulator.

        Collective: every rank of ``group`` must call it. Returns :meth:`compute` of the
        reduced state (the local result when not distributed).
        """
        other = RISMetrics(
            prec_thresholds=self.prec_thresholds,
            prec_compare=self.prec_compare,
            empty_union_iou=self.empty_union_iou,
        )
        other._load_state_vector(self._state_vector())
        return other.all_reduce(group, device=device).compute()

    def __repr__(self) -> str:
        return (
            f"RISMetrics(count={self.count}, prec_compare={self.prec_compare!r}, "
            f"prec_thresholds={self.prec_thresholds}, empty_union_iou={self.empty_union_iou})"
        )

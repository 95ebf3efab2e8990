"""Segmentation and consistency losses (logits-based, always computed in float32).

``segmentation_loss``: BCE-with-logits of the main prediction against the ground-truth mask,
the target resized (nearest) to the logits' size, as in CRIS.

``consistency_loss``: BCE-with-logits of a masked branch against the main branch's detached
probabilities ``sigmoid(M_seg)`` (paper Eq. 9: ``BCELoss(M_LMVSD, M_seg)``). The teacher is the
model itself, so the target is detached: the main branch learns from the ground truth only, and
the consistency term trains the shared weights through the masked branch. ``hard=True`` uses
the thresholded teacher (``sigmoid > threshold``) instead of soft probabilities.

Both losses run with autocast disabled and inputs cast to float32: a bf16 sigmoid saturates
long before float32 and BCE of saturated probabilities is not finite.

Target check (``segmentation_loss``): the ground truth must be binary. A bool mask is accepted
as is (no check, no cost). Integer masks must hold only 0 and 1; float masks may be soft (values
in [0, 1], e.g. label smoothing). Anything else (a 0/255 PNG mask, an index map, negative
values, NaN) is a ``ValueError``: BCE with such a target is not a loss (it goes negative and
the model trains towards garbage). Where the check runs, and what it costs:

* CPU targets (whatever the logits' device): checked at once, one fused min/max pass over the
  mask in the host thread (no device involved).
* CUDA targets: no host synchronisation per step. The min/max are computed on the device and
  copied without blocking into pinned host memory behind a CUDA event; the next
  ``segmentation_loss`` call on that device reads them when the event has completed (it never
  waits on the step in flight) and raises then, naming the earlier bad target. The bad step's
  loss itself is made NaN on the device, so it is never a plausible number (a ``GradScaler``
  skips it). The first target per device and process is checked synchronously (one sync per
  process), so a wrongly prepared dataset fails at the first step. ``check_pending_targets()``
  waits for the checks still in flight (call it at the end of training if you want the last
  step covered by an exception, not just by the NaN loss).
* Other accelerators (MPS, XPU, ...): checked synchronously (one host sync per call).
* Under ``torch.compile`` the check runs outside the graph (``torch.compiler.disable``): one
  graph break in this function.

``check_binary_target(mask)`` runs the same check synchronously, e.g. in a ``Dataset`` (free:
it runs in the data-loader workers).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from masksd.torch_compat import aminmax

__all__ = [
    "segmentation_loss",
    "consistency_loss",
    "as_logit_map",
    "check_binary_target",
    "check_pending_targets",
    "target_validity",
]


def as_logit_map(logits: Tensor, name: str = "logits") -> Tensor:
    """View logits ``[B, h, w]`` or ``[B, 1, h, w]`` as ``[B, 1, h, w]``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if logits.dim() == 3:
        return logits[:, None]
    if logits.dim() == 4 and logits.shape[1] == 1:
        return logits
    raise ValueError(f"{name} must have shape [B, 1, h, w] or [B, h, w], got {tuple(logits.shape)}")


# ----------------------------------------------------------------------------- target check

#: Device types whose target check is deferred (no host sync); others are checked at once.
_DEFERRED_DEVICE_TYPES = frozenset({"cuda"})
#: Deferred checks kept in flight per device before the oldest is waited for (it is several
#: steps old by then, so waiting costs nothing in practice).
_MAX_PENDING = 4


@dataclass
class _PendingCheck:
    """A target check whose min/max are on their way to pinned host memory."""

    host: Tensor  # [2] float64 (pinned): min, max
    event: Any  # torch.cuda.Event (query() / synchronize())
    dtype: torch.dtype
    shape: tuple[int, ...]
    name: str


_lock = threading.Lock()
_pending: dict[torch.device, deque[_PendingCheck]] = {}
_checked_devices: set[torch.device] = set()


def _target_problem(
    low: float, high: float, dtype: torch.dtype, shape: tuple[int, ...], name: str
) -> str | None:
    """The error message for a target whose values span ``[low, high]``, or None if it is fine."""
    if 0.0 <= low and high <= 1.0:  # False for NaN
        return None
    found = f"{name} (dtype {dtype}, shape {list(shape)})"
    head = (
        f"{found} must be a binary mask: bool, or values in {{0, 1}} (float targets may be soft, "
        f"in [0, 1]); "
    )
    if math.isnan(low) or math.isnan(high) or math.isinf(low) or math.isinf(high):
        return head + f"it contains NaN or inf (min {low}, max {high}). Fix the mask before the loss"
    values = f"found values in [{low:g}, {high:g}]"
    if low >= 0.0 and high == 255.0:
        return (
            head + f"{values}. This looks like a 0/255 PNG mask: pass `mask > 0` (bool) or "
            "`mask / 255` (float)"
        )
    if low >= 0.0 and float(high).is_integer():
        return (
            head + f"{values}. This looks like a label or instance-index map: pass the referred "
            "object's mask, e.g. `mask == object_id` (bool)"
        )
    return head + f"{values}. Map it to {{0, 1}} (e.g. `mask > threshold`) or to [0, 1]"


def check_binary_target(target: Tensor, name: str = "target") -> None:
    """Raise ``ValueError`` unless ``target`` is a valid segmentation target (synchronous).

    Args:
        target: any shape; bool (always valid), an integer tensor with values in {0, 1}, or a
            float tensor with values in [0, 1].
        name: how the error message calls the tensor.

    Cost: one min/max pass over ``target``; on an accelerator, one host synchronisation. Meant
    for data pipelines (e.g. a ``Dataset.__getitem__``), where it runs in the loader workers.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype == torch.bool or target.numel() == 0:
        return
    if target.is_complex():
        raise TypeError(f"{name} must be a bool, integer or float mask, got dtype {target.dtype}")
    low, high = (float(v) for v in aminmax(target))
    problem = _target_problem(low, high, target.dtype, tuple(target.shape), name)
    if problem is not None:
        raise ValueError(problem)


def _resolve_pending(device: torch.device, *, wait: bool) -> None:
    """Check the deferred targets of ``device`` whose copies have landed (all of them if ``wait``)."""
    with _lock:
        queue = _pending.get(device)
        if not queue:
            return
        ready: list[_PendingCheck] = []
        while queue and (wait or len(queue) > _MAX_PENDING or queue[0].event.query()):
            ready.append(queue.popleft())
    for check in ready:
        check.event.synchronize()  # no-op when query() was True
        low, high = check.host.tolist()
        problem = _target_problem(low, high, check.dtype, check.shape, check.name)
        if problem is not None:
            raise ValueError(
                f"{problem}. (The check of a CUDA target runs behind the GPU: this {check.name} "
                "was passed to segmentation_loss at an earlier step, whose loss was made NaN.)"
            )


def check_pending_targets(device: torch.device | str | None = None) -> None:
    """Wait for the deferred target checks still in flight and raise on a bad target.

    Args:
        device: only this device's checks (default: every device).

    Raises:
        ValueError: a target passed to ``segmentation_loss`` earlier was not binary.
    """
    devices = list(_pending) if device is None else [torch.device(device)]
    for each in devices:
        _resolve_pending(each, wait=True)


def _copy_to_host_async(stats: Tensor) -> tuple[Tensor, Any]:
    """Start copying ``stats`` (on a CUDA device) into pinned host memory; ``(host, event)``."""
    with torch.cuda.device(stats.device):
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(stats.device))
    return host, event


@torch.compiler.disable
def target_validity(target: Tensor, name: str = "target") -> Tensor | None:
    """Check ``target``'s values as ``segmentation_loss`` does (see the module docstring).

    Returns:
        None when the check ran synchronously (it raised if needed), else a device bool scalar
        that is False when the target is bad (to poison the loss with NaN).
    """
    if target.dtype == torch.bool or target.numel() == 0 or target.device.type == "meta":
        return None
    device = target.device
    if device.type not in _DEFERRED_DEVICE_TYPES:
        check_binary_target(target, name)
        return None
    _resolve_pending(device, wait=False)
    if device not in _checked_devices:
        check_binary_target(target, name)  # one sync per device and process
        _checked_devices.add(device)
        return None
    low, high = aminmax(target)
    stats = torch.stack([low.to(torch.float64), high.to(torch.float64)])
    host, event = _copy_to_host_async(stats)
    with _lock:
        _pending.setdefault(device, deque()).append(
            _PendingCheck(host=host, event=event, dtype=target.dtype, shape=tuple(target.shape), name=name)
        )
    return (stats[0] >= 0) & (stats[1] <= 1)  # False for NaN


def _autocast_off(tensor: Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def segmentation_loss(logits: Tensor, target: Tensor, *, checked: bool = False) -> Tensor:
    """Mean BCE-with-logits of ``logits`` against a binary ``target`` mask.

    Args:
        logits: ``[B, 1, h, w]`` or ``[B, h, w]``.
        target: ``[B, H, W]`` or ``[B, 1, H, W]``: bool, integer with values in {0, 1}, or float
            with values in [0, 1] (soft targets, e.g. label smoothing, are accepted); resized
            with nearest-neighbour to ``h × w`` when sizes differ.
        checked: the caller already checked the target's values (masksd's engine does, once per
            step, before the model runs); skip that check here.

    Returns:
        scalar float32 loss.

    Raises:
        ValueError: ``target`` is not binary (e.g. a 0/255 PNG mask). On CUDA the check is
            deferred to the next call (see the module docstring); that step's loss is NaN.
    """
    logits = as_logit_map(logits)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dim() == 3:
        target = target[:, None]
    if target.dim() != 4 or target.shape[1] != 1:
        raise ValueError(f"target must have shape [B, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target batch size {target.shape[0]} does not match logits batch size {logits.shape[0]}"
        )
    if target.is_complex():
        raise TypeError(f"target must be a bool, integer or float mask, got dtype {target.dtype}")
    valid = None if checked else target_validity(target, "target")
    with _autocast_off(logits):
        target = target.to(device=logits.device, dtype=torch.float32)
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        if valid is not None:
            loss = torch.where(valid.to(loss.device), loss, torch.full_like(loss, float("nan")))
        return loss


def consistency_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    hard: bool = False,
    threshold: float = 0.5,
) -> Tensor:
    """Mean BCE-with-logits of a branch against the detached main-branch prediction.

    Args:
        student_logits: ``[B, 1, h, w]`` or ``[B, h, w]``, the masked branch ``M_LMVSD``/``M_VMLSD``.
        teacher_logits: same shape, the main branch ``M_seg`` (detached here).
        hard: use ``sigmoid(teacher) > threshold`` as a binary target instead of probabilities.
        threshold: probability threshold for ``hard`` targets, in (0, 1).

    Returns:
        scalar float32 loss; gradients reach the student only.
    """
    student = as_logit_map(student_logits, "student_logits")
    teacher = as_logit_map(teacher_logits, "teacher_logits")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} "
            "must have the same shape"
        )
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    with _autocast_off(student):
        target = torch.sigmoid(teacher.detach().float())
        if hard:
            target = (target > threshold).float()
        return F.binary_cross_entropy_with_logits(student.float(), target)

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["segmentation_loss", "consistency_loss", "as_logit_map"]


def as_logit_map(logits: Tensor, name: str = "logits") -> Tensor:
    """View logits ``[B, h, w]`` or ``[B, 1, h, w]`` as ``[B, 1, h, w]``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if logits.dim() == 3:
        return logits[:, None]
    if logits.dim() == 4 and logits.shape[1] == 1:
        return logits
    raise ValueError(f"{name} must have shape [B, 1, h, w] or [B, h, w], got {tuple(logits.shape)}")


def _autocast_off(tensor: Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean BCE-with-logits of ``logits`` against a binary ``target`` mask.

    Args:
        logits: ``[B, 1, h, w]`` or ``[B, h, w]``.
        target: ``[B, H, W]`` or ``[B, 1, H, W]``, bool or float in {0, 1} (soft values in
            [0, 1] are accepted); resized with nearest-neighbour to ``h × w`` when sizes differ.

    Returns:
        scalar float32 loss.
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
    with _autocast_off(logits):
        target = target.to(device=logits.device, dtype=torch.float32)
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
        return F.binary_cross_entropy_with_logits(logits.float(), target)


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

"""``masksd.losses``: segmentation and consistency losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from masksd.losses import as_logit_map, consistency_loss, segmentation_loss


def _manual_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(target.double() * torch.log(p) + (1 - target.double()) * torch.log1p(-p)).mean()


def test_segmentation_loss_resizes_target_nearest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 32, 32, generator=g) > 0.5).float()
    loss = segmentation_loss(logits, target)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    resized = F.interpolate(target[:, None], size=(8, 8), mode="nearest")
    # Nearest with an integer factor of 4 picks every 4th pixel starting at 0.
    assert torch.equal(resized, target[:, None, ::4, ::4])
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, resized))
    torch.testing.assert_close(loss.double(), _manual_bce(logits, resized))


def test_segmentation_loss_accepts_layouts_and_dtypes():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 6, 6, generator=g)
    target = torch.rand(2, 12, 12, generator=g) > 0.5
    reference = segmentation_loss(logits, target)
    torch.testing.assert_close(segmentation_loss(logits, target[:, None]), reference)
    torch.testing.assert_close(segmentation_loss(logits[:, 0], target), reference)
    torch.testing.assert_close(segmentation_loss(logits, target.float()), reference)
    # same size: no resize
    same = torch.rand(2, 6, 6, generator=g) > 0.5
    torch.testing.assert_close(
        segmentation_loss(logits, same), F.binary_cross_entropy_with_logits(logits, same[:, None].float())
    )


def test_segmentation_loss_errors():
    logits = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="batch size"):
        segmentation_loss(logits, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="target"):
        segmentation_loss(logits, torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="target"):
        segmentation_loss(logits, torch.zeros(2, 16))
    with pytest.raises(TypeError, match="target"):
        segmentation_loss(logits, [[0.0]])
    with pytest.raises(ValueError, match="logits"):
        segmentation_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match="logits"):
        segmentation_loss(torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4))
    assert as_logit_map(torch.zeros(2, 4, 4)).shape == (2, 1, 4, 4)


def test_consistency_loss_matches_manual_bce_and_detaches_teacher():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 1, 5, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 1, 5, 5, generator=g, requires_grad=True)
    loss = consistency_loss(student, teacher)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), _manual_bce(student.detach(), torch.sigmoid(teacher.detach())))
    loss.backward()
    assert teacher.grad is None, "no gradient may reach the teacher logits"
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    # d/dx BCE(x, p) = (sigmoid(x) - p) / numel
    expected = (torch.sigmoid(student.detach()) - torch.sigmoid(teacher.detach())) / student.numel()
    torch.testing.assert_close(student.grad, expected)


def test_consistency_loss_teacher_shared_with_student_graph():
    """The teacher is usually part of the same graph as the student: still no gradient."""
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    teacher = x * 2.0
    student = x * 3.0
    consistency_loss(student, teacher).backward()
    expected = 3.0 * (torch.sigmoid(3.0 * x.detach()) - torch.sigmoid(2.0 * x.detach())) / x.numel()
    torch.testing.assert_close(x.grad, expected)


def test_consistency_loss_hard_vs_soft():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 6, 6, generator=g)
    teacher = torch.randn(2, 6, 6, generator=g)
    soft = consistency_loss(student, teacher)
    hard = consistency_loss(student, teacher, hard=True)
    assert not torch.allclose(soft, hard)
    hard_target = (torch.sigmoid(teacher) > 0.5).float()[:, None]
    torch.testing.assert_close(hard.double(), _manual_bce(student[:, None], hard_target))
    high = consistency_loss(student, teacher, hard=True, threshold=0.9)
    target_high = (torch.sigmoid(teacher) > 0.9).float()[:, None]
    torch.testing.assert_close(high.double(), _manual_bce(student[:, None], target_high))


def test_consistency_loss_errors():
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="threshold"):
        consistency_loss(torch.randn(2, 4, 4), torch.randn(2, 4, 4), hard=True, threshold=1.0)
    with pytest.raises(ValueError, match="student_logits"):
        consistency_loss(torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4))


def test_losses_float32_and_finite_under_bf16_autocast_with_large_logits():
    g = torch.Generator().manual_seed(4)
    sign = torch.where(torch.rand(2, 1, 8, 8, generator=g) > 0.5, 1.0, -1.0)
    weight = torch.full((1,), 40.0, requires_grad=True)
    target = torch.rand(2, 16, 16, generator=g) > 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = (sign * weight).to(torch.bfloat16)
        teacher = (-sign * 40.0).to(torch.bfloat16)
        seg = segmentation_loss(student, target)
        soft = consistency_loss(student, teacher)
        hard = consistency_loss(student, teacher, hard=True)
    for loss in (seg, soft, hard):
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
    # student and teacher disagree everywhere by 80 logits: the loss is about 40.
    assert 39.0 < soft.detach().item() < 41.0
    (seg + soft + hard).backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()

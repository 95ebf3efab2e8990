"""``masksd.losses``: segmentation and consistency losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from masksd import losses
from masksd.losses import (
    as_logit_map,
    check_binary_target,
    check_pending_targets,
    consistency_loss,
    segmentation_loss,
)


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


# ----------------------------------------------------------------------------- binary targets


def _logits_and_mask(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    mask = torch.rand(2, 16, 16, generator=g) > 0.5
    return logits, mask


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64])
def test_segmentation_loss_refuses_0_255_png_masks(dtype):
    logits, mask = _logits_and_mask()
    png = mask.to(dtype) * 255
    with pytest.raises(ValueError, match=r"target .*0/255 PNG mask.*mask > 0.*mask / 255"):
        segmentation_loss(logits, png)


@pytest.mark.parametrize(
    ("bad", "hint"),
    [
        (lambda m: m.long() * 3, "index map"),
        (lambda m: m.float() * 2 - 1, r"\[-1, 1\]"),
        (lambda m: m.float() * 1.5, r"\[0, 1.5\]"),
        (lambda m: torch.where(m, float("nan"), 0.0), "NaN"),
    ],
)
def test_segmentation_loss_refuses_non_binary_targets(bad, hint):
    logits, mask = _logits_and_mask()
    with pytest.raises(ValueError, match=hint) as info:
        segmentation_loss(logits, bad(mask))
    assert str(info.value).startswith("target (dtype")


def test_segmentation_loss_valid_targets_unchanged():
    """bool, {0, 1} integers/floats and soft floats pass; values equal plain BCE."""
    logits, mask = _logits_and_mask()
    resized = mask[:, None, ::2, ::2].float()
    reference = F.binary_cross_entropy_with_logits(logits, resized)
    for target in (mask, mask.float(), mask.double(), mask.to(torch.uint8), mask.long(), mask.half()):
        assert torch.equal(segmentation_loss(logits, target), reference)
    soft = mask.float() * 0.8 + 0.1  # label smoothing
    torch.testing.assert_close(
        segmentation_loss(logits, soft), F.binary_cross_entropy_with_logits(logits, soft[:, None, ::2, ::2])
    )
    # all-background and all-foreground masks are binary too
    segmentation_loss(logits, torch.zeros(2, 16, 16, dtype=torch.uint8))
    segmentation_loss(logits, torch.ones(2, 16, 16))


def test_check_binary_target_public_helper():
    check_binary_target(torch.tensor([0, 1], dtype=torch.uint8))
    check_binary_target(torch.tensor([0.25, 1.0]))
    with pytest.raises(ValueError, match="mask_png .*0/255"):
        check_binary_target(torch.tensor([0, 255], dtype=torch.uint8), name="mask_png")
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        check_binary_target([0, 1])


class _FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


@pytest.fixture
def deferred_cpu(monkeypatch):
    """Run the CUDA (deferred) code path on CPU: host copy is a clone, events are controllable."""
    events: list[_FakeEvent] = []

    def copy(stats):
        events.append(_FakeEvent())
        return stats.clone(), events[-1]

    monkeypatch.setattr(losses, "_DEFERRED_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(losses, "_copy_to_host_async", copy)
    monkeypatch.setattr(losses, "_pending", {})
    monkeypatch.setattr(losses, "_checked_devices", set())
    return events


def test_deferred_check_first_call_is_synchronous(deferred_cpu):
    logits, mask = _logits_and_mask()
    with pytest.raises(ValueError, match="0/255"):
        segmentation_loss(logits, mask.float() * 255)
    assert deferred_cpu == []  # checked at once, nothing deferred


def test_deferred_check_poisons_loss_and_raises_at_next_call(deferred_cpu):
    logits, mask = _logits_and_mask()
    good = segmentation_loss(logits, mask.float())  # first call: synchronous, fine
    assert torch.equal(segmentation_loss(logits, mask.float()), good)  # deferred, valid: unchanged
    deferred_cpu[-1].done = True
    bad = segmentation_loss(logits, mask.float() * 255)  # deferred: no exception yet ...
    assert torch.isnan(bad)  # ... but the loss is never a plausible number
    # the copy is still in flight: the next call does not wait for it
    segmentation_loss(logits, mask.float())
    deferred_cpu[1].done = True
    with pytest.raises(ValueError, match=r"0/255 PNG mask.*earlier step"):
        segmentation_loss(logits, mask.float())


def test_check_pending_targets_waits_for_checks_in_flight(deferred_cpu):
    logits, mask = _logits_and_mask()
    segmentation_loss(logits, mask)  # bool: never checked, never deferred
    segmentation_loss(logits, mask.float())  # first checked call: synchronous
    segmentation_loss(logits, mask.long() * 2)  # deferred, not complete
    check_pending_targets("cuda:3")  # another device: nothing to do
    with pytest.raises(ValueError, match="index map"):
        check_pending_targets()
    check_pending_targets()  # queue drained

"""Checks of one training step's inputs that run *before* the model does.

Without them a user sees the model's own error for masksd's mistake (CRIS's ``'NoneType' object
has no attribute 'shape'`` for a missing target) or, worse, nothing at all: a float 0/255 mask
passed to a model that computes its own loss trains silently. So every training forward, and
``wrapper.check(...)``, first checks:

* that a target is there when something needs it (masksd's BCE, a user ``criterion``, or a
  model that takes the mask as a forward argument, ``HookSpec.target``);
* that the target is a mask ``[B, H, W]`` / ``[B, 1, H, W]`` of binary values (the check of
  ``masksd.losses``: on CUDA deferred without a host sync, the bad step's loss made NaN);
* that every input of the step holds the same number of samples (image, ids, attention mask,
  target), naming the arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from masksd.engine.plan import Plan
from masksd.losses import target_validity
from masksd.spec import HookSpec

__all__ = ["check_inputs", "check_same_batch", "check_step_target", "image_argument", "split_target"]


def check_step_target(target: Any, *, batch: int | None, where: str = "target") -> Tensor | None:
    """Check a step's ground-truth mask before the model runs.

    Args:
        target: ``[B, H, W]`` or ``[B, 1, H, W]``; bool, integer in {0, 1} or float in [0, 1].
        batch: the step's batch size when known (from the inputs), else None.
        where: how the message names the target.

    Returns:
        None when the values were checked at once (CPU), else a device bool scalar, False for a
        bad target, that the engine uses to make the step's loss NaN (CUDA: see ``masksd.losses``).

    Raises:
        TypeError / ValueError: not a tensor, wrong shape or batch size, or non-binary values
            (a 0/255 mask: divide it by 255 or compare it with 0).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor mask [B, H, W], got {type(target).__name__}")
    if target.is_complex():
        raise TypeError(f"{where} must be a bool, integer or float mask, got dtype {target.dtype}")
    if not (target.dim() == 3 or (target.dim() == 4 and target.shape[1] == 1)):
        raise ValueError(f"{where} must have shape [B, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
    if batch is not None and target.shape[0] != batch:
        raise ValueError(
            f"{where} holds {target.shape[0]} masks but the inputs hold {batch} samples; "
            "give one mask per (image, sentence) pair"
        )
    return target_validity(target, where)


def check_same_batch(sizes: Mapping[str, int]) -> int | None:
    """Refuse inputs of one step whose batch sizes differ; returns the common size (None if none).

    Args:
        sizes: ``{description: batch size}``, e.g. ``{"img (HookSpec.image.argument)": 2}``.
    """
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(
            f"the inputs of this step have different batch sizes ({listed}); every input must hold "
            "the same samples: one sentence per image (repeat an image for each of its sentences)"
        )
    return distinct.pop() if distinct else None


def image_argument(spec: HookSpec, arguments: Mapping[str, Any]) -> str | None:
    """The forward argument holding the images: ``HookSpec.image.argument``, else the only
    floating 4-D tensor among the bound ``arguments`` (None when there is not exactly one)."""
    if spec.image is not None and spec.image.argument is not None:
        if spec.image.argument not in arguments:
            raise ValueError(
                f"HookSpec.image.argument is {spec.image.argument!r} but the forward call has no such "
                f"argument (got {sorted(arguments)}); name the argument that carries the images"
            )
        return spec.image.argument
    images = [name for name, value in arguments.items()
              if isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 4
              and name != spec.target]
    return images[0] if len(images) == 1 else None


def batch_sizes(spec: HookSpec, arguments: Mapping[str, Any]) -> dict[str, int]:
    """Batch sizes of a hooked model's inputs, by argument: the images, the ids, the attention
    mask (``[B, L]`` tensors named by the spec) and the target argument (``HookSpec.target``)."""
    names: dict[str, str] = {}
    image = image_argument(spec, arguments)
    if image is not None:
        names[image] = (
            "HookSpec.image.argument" if spec.image is not None and spec.image.argument else "the images"
        )
    if spec.text is not None:
        ids = spec.text.argument or spec.text.maskable.ids
        for name, role in ((ids, "the ids"), (spec.text.maskable.attention_mask, "the attention mask")):
            if name is not None:
                names.setdefault(name, role)
    if spec.target is not None:
        names.setdefault(spec.target, "HookSpec.target")
    return {f"{name!r} ({role})": int(arguments[name].shape[0]) for name, role in names.items()
            if isinstance(arguments.get(name), Tensor) and arguments[name].dim() > 0}


def split_target(
    plan: Plan, args: tuple[Any, ...], kwargs: dict[str, Any], target: Tensor | None
) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
    """The model's call and the step's target: a ``target=`` goes into the forward argument
    ``HookSpec.target`` when the model takes it, and is read back from there."""
    name = plan.spec.target
    if name is None:
        return args, kwargs, target
    if target is not None:
        if name in kwargs:
            raise TypeError(f"target given twice (target= and {name}=)")
        kwargs = {**kwargs, name: target}
    return args, kwargs, plan.bind(args, kwargs).get(name)


def check_inputs(
    plan: Plan, args: tuple[Any, ...], kwargs: dict[str, Any], target: Tensor | None, *, criterion: bool
) -> Tensor | None:
    """masksd's checks of a training step, before the model runs (see the module docstring);
    returns the deferred target check's flag (CUDA) or None. ``criterion``: a user loss reads the
    target."""
    batch = check_same_batch(batch_sizes(plan.spec, plan.bind(args, kwargs)))
    if target is not None:
        return check_step_target(target, batch=batch)
    needed_by = None
    if plan.spec.target is not None:
        needed_by = f"{type(plan.model).__name__}.forward takes it as {plan.spec.target!r}, HookSpec.target"
    elif criterion:
        needed_by = "criterion= computes the segmentation loss from it"
    elif plan.spec.loss is None:
        needed_by = "masksd's segmentation loss"
    if needed_by is None:
        return None
    raise ValueError(
        f"target (the ground-truth mask [B, H, W]) is required in training mode ({needed_by}): "
        "wrapper(..., target=mask), or call wrapper.eval() for inference"
    )

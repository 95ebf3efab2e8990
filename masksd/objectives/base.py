"""The plug-in contract for training objectives.

An objective is an ``nn.Module`` with a ``name`` and a ``weight`` whose ``forward`` receives the
``DistillContext`` of one training step (everything the main branch computed) and returns an
``ObjectiveOutput``: an unweighted scalar loss and a dict of tensors for inspection. The wrapper
adds ``weight * loss`` to the total. LMVSD and VMLSD are the first two; other auxiliary
objectives (mask grounding, language reconstruction, ...) plug in the same way through
``MaskedSelfDistill(extra_objectives=[...])``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from masksd.towers import Embedded, Encoded

if TYPE_CHECKING:
    from masksd.towers import RISModel

__all__ = ["DistillContext", "ObjectiveOutput", "Objective"]


@dataclass
class DistillContext:
    """What the main branch of one training step produced.

    Attributes:
        model: the bare ``RISModel`` (shared weights).
        image_embedded / text_embedded: ``Embedded`` outputs of the two towers.
        image_encoded / text_encoded: ``Encoded`` outputs of the main branch.
        main_logits: ``[B, 1, h, w]`` main-branch logits ``M_seg`` (not detached).
        target: ground-truth mask ``[B, H, W]`` or None.
        generator: optional ``torch.Generator`` for reproducible masking.
    """

    model: RISModel
    image_embedded: Embedded
    text_embedded: Embedded
    image_encoded: Encoded
    text_encoded: Encoded
    main_logits: Tensor
    target: Tensor | None = None
    generator: torch.Generator | None = None


@dataclass
class ObjectiveOutput:
    """Result of one objective: an unweighted scalar ``loss`` and inspection tensors."""

    loss: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module, abc.ABC):
    """Base class of training-only objectives (see the module docstring).

    Subclasses set ``name`` (a unique key for the loss dict) and ``weight`` and implement
    ``forward``.
    """

    name: str = "objective"
    weight: float = 1.0

    @abc.abstractmethod
    def forward(self, context: DistillContext) -> ObjectiveOutput:
        """Compute this objective's unweighted loss from the step's context."""

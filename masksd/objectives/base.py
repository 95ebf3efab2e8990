"""The plug-in contract for training objectives.

An objective is an ``nn.Module`` with a ``name`` and a ``weight`` whose ``forward`` receives the
``DistillContext`` of one training step (everything the main branch computed, and the backend
that can run masked branches) and returns an ``ObjectiveOutput``: an unweighted scalar loss and
a dict of inspection values. The wrapper adds ``weight * loss`` to the total. LMVSD and VMLSD
are the first two; further objectives plug in through
``MaskedSelfDistill(extra_objectives=[...])`` / ``masksd.wrap(..., extra_objectives=[...])``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from masksd.towers import Embedded, Encoded, Fused

if TYPE_CHECKING:
    from masksd.backends.base import Backend

__all__ = ["DistillContext", "ObjectiveOutput", "Objective"]


@dataclass
class DistillContext:
    """What the main branch of one training step produced.

    Attributes:
        model: the bare model (a ``RISModel`` for towers, the user's module for hooks).
        image_embedded / text_embedded: ``Embedded`` tokens of each modality (``[B, N, C]``
            view, maskable, grid); None for a modality a hooked model does not declare.
        image_encoded / text_encoded: ``Encoded`` scoring features of the main branch (towers:
            the towers' outputs; hooks: the declared taps, detached), or None.
        main_logits: ``[B, 1, h, w]`` main-branch logits ``M_seg`` (not detached).
        target: ground-truth mask ``[B, H, W]`` or None.
        generator: optional ``torch.Generator`` for reproducible masking.
        backend: runs masked branches (``backend.run_masked(modality, masked, mask_token)``).
        output: the model's own return value of the main branch (hooks), else the logits.
    """

    model: nn.Module
    image_embedded: Embedded | None
    text_embedded: Embedded | None
    image_encoded: Encoded | None
    text_encoded: Encoded | None
    main_logits: Tensor
    target: Tensor | None = None
    generator: torch.Generator | None = None
    backend: Backend | None = None
    output: Any = None

    def embedded(self, modality: str) -> Embedded:
        """The ``Embedded`` of ``"image"`` or ``"text"`` (ValueError if the model has none)."""
        value = getattr(self, f"{modality}_embedded")
        if value is None:
            raise ValueError(f"the model declares no {modality} embedding (HookSpec.{modality} is None)")
        return value

    def encoded(self, modality: str) -> Encoded | None:
        """The scoring features of ``"image"`` or ``"text"``, or None when none were declared."""
        return getattr(self, f"{modality}_encoded")

    # Optional capabilities, served by the backend from what the model provides (see
    # docs/objectives.md); each raises a TypeError naming what is missing. LMVSD/VMLSD use none.
    def _backend(self, what: str) -> Backend:
        if self.backend is None:
            raise ValueError(f"{what} needs the context's backend, which is None (build contexts in the wrapper)")
        return self.backend

    def token_ids(self) -> Tensor:
        """Token ids ``[B, L]`` int64 of the text, lined up with ``text_embedded`` (towers:
        ``text_tower.token_ids(embedded)`` or ``Embedded.extras["ids"]``; hooks: the forward
        argument named by ``HookSpec.text.maskable.ids``)."""
        return self._backend("token_ids()").token_ids()

    def word_embedding(self) -> Tensor:
        """The model's input-embedding matrix ``[V, C]`` itself (towers: ``text_tower.word_embedding``
        or ``.token_embedding``; hooks: ``HookSpec.text.embed`` when it is an ``nn.Embedding``)."""
        return self._backend("word_embedding()").word_embedding()

    def encoded_with_grad(self, modality: str) -> Encoded:
        """The main branch's scoring features of ``modality`` with their autograd graph (towers: the
        towers' ``Encoded``; hooks: the declared taps, not detached)."""
        value = self._backend("encoded_with_grad()").encoded_with_grad(modality)  # type: ignore[arg-type]
        if value is None:
            raise ValueError(f"the model declares no {modality} scoring features (HookSpec.{modality}.tokens)")
        return value

    def fused(self) -> Fused:
        """The decoder's fused features ``[B, N, D]`` of the main branch's one decoder pass (towers:
        ``decoder.forward_with_fused``; hooks: ``HookSpec.fused``)."""
        return self._backend("fused()").fused()

    def encode_masked(self, modality: str, masked: Tensor, mask_token: Tensor) -> dict[str, Encoded | None]:
        """Both modalities' scoring features (with gradients) of a pass where the ``masked [B, N]``
        embedded tokens of ``modality`` are replaced by ``mask_token [C]``; the decoder does not run
        where the backend can avoid it."""
        return self._backend("encode_masked()").encode_masked(modality, masked, mask_token)  # type: ignore[arg-type]


@dataclass
class ObjectiveOutput:
    """Result of one objective: an unweighted scalar ``loss`` and inspection values."""

    loss: Tensor
    info: dict[str, Any] = field(default_factory=dict)


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

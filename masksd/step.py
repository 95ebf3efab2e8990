"""``Step``: the facts of one training step, computed once by the engine and read by objectives.

The engine runs the main branch, then builds one ``Step``: the logits, the target, the model's
own output and loss, and per modality a ``View`` (the embedded tokens, the scoring features and
the *units* selection happens on). Objectives and scorers read it as plain data; whatever needs
another forward pass (a masked branch, the fused features, token ids) they ask the engine's
``Runner`` for (``masksd.engine.runner``).

Units are the grid the scores live on. When the scoring tokens lie on a coarser grid than the
embedded tokens (a CNN's last stage over its stem), or ``ModalitySpec.units`` declares one,
selection happens on that grid and the boolean mask is expanded onto the embedded grid
(``masksd.masking.expand_mask``), so that a masked unit is a solid block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from masksd.masking import expand_mask, shrink_mask
from masksd.towers import Embedded, Encoded

__all__ = ["MODALITIES", "Modality", "Step", "Units", "View", "other", "units_of"]

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, Modality] = ("image", "text")


def other(modality: str) -> Modality:
    """The other modality: ``"text"`` for ``"image"`` and the reverse."""
    return "text" if modality == "image" else "image"


@dataclass
class Units:
    """Where selection happens for one modality.

    Attributes:
        maskable: ``[B, N_u]`` bool, units that may be kept and masked.
        grid: ``(h_u, w_u)`` of the units, or None for sequences.
        embedded_grid: ``(h, w)`` of the embedded tokens (None for sequences).
        coarse: True when units are coarser than the embedded tokens (masks get expanded).
    """

    maskable: Tensor
    grid: tuple[int, int] | None
    embedded_grid: tuple[int, int] | None
    coarse: bool

    def expand(self, unit_mask: Tensor, embedded_maskable: Tensor) -> Tensor:
        """``[B, N_u]`` unit mask → ``[B, N]`` mask over the embedded tokens."""
        if not self.coarse:
            return unit_mask
        assert self.grid is not None and self.embedded_grid is not None
        return expand_mask(unit_mask, self.grid, self.embedded_grid) & embedded_maskable


def units_of(
    modality: str, embedded: Embedded, encoded: Encoded | None, *, declared: tuple[int, int] | None = None,
    tokens_declared: bool = True,
) -> Units:
    """The units of one modality (see the module docstring); ``declared`` is ``ModalitySpec.units``."""
    if declared is not None and embedded.grid is not None and tuple(declared) != tuple(embedded.grid):
        if (
            encoded is not None and tokens_declared and encoded.grid is not None
            and encoded.grid != tuple(declared)
        ):
            raise ValueError(
                f"ModalitySpec.units is {tuple(declared)} but the {modality} scoring tokens lie on a "
                f"{encoded.grid} grid; drop units= (the tokens' grid is used) or tap tokens on that grid"
            )
        grid = (int(declared[0]), int(declared[1]))
        return Units(shrink_mask(embedded.maskable, embedded.grid, grid), grid, embedded.grid, coarse=True)
    if encoded is not None and encoded.grid is not None and embedded.grid is not None:
        if encoded.grid != embedded.grid and encoded.tokens.shape[1] != embedded.tokens.shape[1]:
            maskable = shrink_mask(embedded.maskable, embedded.grid, encoded.grid)
            return Units(maskable, encoded.grid, embedded.grid, coarse=True)
    # a copy, not the embedded record's tensor: torch 2.1's dynamo fails on one tensor reached by two
    # paths of a step (a guard on a symbol with no source, pytorch/pytorch#90665)
    return Units(embedded.maskable.clone(), embedded.grid, embedded.grid, coarse=False)


@dataclass
class View:
    """One modality of a step.

    Attributes:
        embedded: the embedded tokens (``[B, N, C]`` view, ``maskable``, grid) of the main branch.
        encoded: the scoring features of the main branch (detached for hooked models; the towers'
            own ``Encoded`` for the tower entry), or None when the spec declares none.
        units: where selection happens (``Units``).
        tokens_declared: False when ``encoded.tokens`` is a stand-in (only a global feature was
            declared): token scorers refuse it.
    """

    embedded: Embedded
    encoded: Encoded | None
    units: Units
    tokens_declared: bool = True


@dataclass
class Step:
    """What the main branch of one training step produced.

    Attributes:
        model: the bare model (the user's module; a ``RISModel`` for the tower entry).
        logits: ``[B, 1, h, w]`` main-branch logits ``M_seg`` (two-class logits converted; not
            detached).
        raw_logits: the logits as the model gives them (what a user ``criterion`` receives).
        target: ground-truth mask ``[B, H, W]``, or None when the model's own loss is used and no
            target reached masksd.
        output: the model's own return value of the main branch.
        model_loss: the model's own training loss when ``HookSpec.loss`` names one, else None.
        generator: the ``torch.Generator`` the step's masks are drawn from (None: the global one).
        views: per declared modality, its ``View``.
        inputs: the forward's ``(args, kwargs)``, which extra passes run again.
        record: the engine's record of the main forward (``masksd.engine.recorder.Run``), which
            extra passes replay and mask.
    """

    model: nn.Module
    logits: Tensor
    raw_logits: Tensor
    target: Tensor | None
    output: Any = None
    model_loss: Tensor | None = None
    generator: torch.Generator | None = None
    views: dict[str, View] = field(default_factory=dict)
    inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
    record: Any = None

    def view(self, modality: str) -> View:
        """The ``View`` of ``"image"`` or ``"text"`` (ValueError when the spec declares none)."""
        view = self.views.get(modality)
        if view is None:
            raise ValueError(f"the model declares no {modality} embedding (HookSpec.{modality} is None)")
        return view

    def embedded(self, modality: str) -> Embedded:
        """The main branch's embedded tokens of ``modality``."""
        return self.view(modality).embedded

    def encoded(self, modality: str) -> Encoded | None:
        """The main branch's scoring features of ``modality``, or None when none were declared."""
        view = self.views.get(modality)
        return None if view is None else view.encoded

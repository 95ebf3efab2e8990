"""The plug-in contract for training objectives.

An objective is an ``nn.Module`` with a ``name`` and a ``weight`` whose ``forward(step, runner)``
receives the ``Step`` of one training step (``masksd.step``: everything the main branch computed,
as plain data) and the engine's ``Runner`` (``masksd.engine.runner``: it runs extra passes and
reads what the model provides beyond the step), and returns an ``ObjectiveOutput``: an
unweighted scalar loss and a dict of inspection values. The wrapper adds ``weight * loss`` to the
total. LMVSD and VMLSD are the first two; further objectives plug in through
``extra_objectives=[...]``::

    class Agreement(Objective):
        name, weight = "agree", 0.1

        def forward(self, step, runner):
            masked = torch.zeros_like(step.embedded("text").maskable)
            logits = runner.rerun(step, mask={"text": (masked, None)})  # one more pass, unmasked
            return ObjectiveOutput(loss=consistency_loss(logits, step.logits))
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from masksd.step import Step

if TYPE_CHECKING:
    from masksd.engine.runner import Runner

__all__ = ["ObjectiveOutput", "Objective"]


@dataclass
class ObjectiveOutput:
    """Result of one objective: an unweighted scalar ``loss`` and inspection values."""

    loss: Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Objective(nn.Module, abc.ABC):
    """Base class of training-only objectives (see the module docstring).

    Subclasses set ``name`` (a unique key for the loss dict) and ``weight`` and implement
    ``forward(step, runner)``.
    """

    name: str = "objective"
    _weight: float = 1.0

    @property
    def weight(self) -> float:
        """The loss weight: ``config.weight`` when the objective has such a config (the one place
        it is stored; ``wrapper.set_weights`` changes it there), else the value set here."""
        config = getattr(self, "config", None)
        weight = getattr(config, "weight", None)
        return float(weight) if weight is not None else self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = float(value)

    @abc.abstractmethod
    def forward(self, step: Step, runner: Runner) -> ObjectiveOutput:
        """Compute this objective's unweighted loss from the step (and extra passes of ``runner``)."""

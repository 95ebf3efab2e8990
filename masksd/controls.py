"""Changing a wrapper's objectives during training: loss weights (ramps, warm-ups) and switching
objectives off for some steps, without re-wrapping (which would make new mask tokens).

``MaskedSelfDistill`` inherits these methods::

    wrapper.set_weights(lmvsd=0.25 * min(1.0, epoch / 5))   # a ramp, e.g. per epoch
    with wrapper.disabled_objectives():                      # a plain step: only "seg" runs
        out = wrapper(images, ids, target=masks)
    with wrapper.disabled_objectives("vmlsd"):               # LMVSD only for these steps
        ...

A weight of 0 still runs its branch (its loss is reported, its parameters get zero gradients); a
disabled objective does not run at all, costs nothing, and reports no loss. Under DDP with
``find_unused_parameters=False`` the parameters of a disabled objective (its mask token) get no
gradient, which DDP refuses at the next step: set the weight to 0 instead, or use
``find_unused_parameters=True``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ObjectiveControls"]


class ObjectiveControls:
    """Mixin for ``MaskedSelfDistill`` (needs ``objectives``, ``seg_weight``, ``config`` and
    ``_disabled``, a frozenset of objective names)."""

    objectives: Any
    seg_weight: float
    config: Any
    _disabled: frozenset[str]

    def _objective_names(self, names: Any, argument: str) -> list[str]:
        known = list(self.objectives)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"{argument}: no objective named {unknown}; this wrapper has {known}")
        return list(names)

    def set_weights(self, **weights: float) -> None:
        """Set loss weights by name: ``seg`` (the main term) and any objective (``lmvsd``,
        ``vmlsd``, extra objectives' names). Values are finite numbers >= 0. ``wrapper.config``
        and each objective's ``config`` are updated too, so what is saved stays true."""
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"set_weights: {name} must be a finite number >= 0, got {value!r}")
        names = self._objective_names([n for n in weights if n != "seg"], "set_weights")
        if "seg" in weights:
            self.seg_weight = float(weights["seg"])
            self.config = dataclasses.replace(self.config, seg_weight=self.seg_weight)
        for name in names:
            objective, weight = self.objectives[name], float(weights[name])
            objective.weight = weight
            own = getattr(objective, "config", None)
            if dataclasses.is_dataclass(own) and any(f.name == "weight" for f in dataclasses.fields(own)):
                objective.config = dataclasses.replace(own, weight=weight)
            if name in ("lmvsd", "vmlsd") and getattr(self.config, name, None) is not None:
                branch = dataclasses.replace(getattr(self.config, name), weight=weight)
                self.config = dataclasses.replace(self.config, **{name: branch})

    @contextmanager
    def disabled_objectives(self, *names: str) -> Iterator[None]:
        """Within the block, training steps skip the named objectives (none named: all of them);
        ``out.losses`` then holds ``"seg"`` and the objectives still on. Nests; restores on exit."""
        chosen = self._objective_names(names, "disabled_objectives") if names else list(self.objectives)
        before = self._disabled
        self._disabled = before | frozenset(chosen)
        try:
            yield
        finally:
            self._disabled = before

"""The fusion probe of the hook backend: does a modality's output depend on the other's tokens?

Once, before the first main branch (unless ``HookSpec.fusion`` declares it), the model runs with
its embedding outputs replaced by leaves that require grad; autograd then tells whether each
modality's ``reuse`` outputs (or, without them, its scoring tokens) depend on the other
modality's embedding. A modality whose features do not depend on the other may be reused
(skipped) in the branch that masks the other; otherwise that branch is a full forward. BatchNorm
running statistics and the RNG state are left untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from masksd.backends.base import Modality, rng_devices, running_stats_frozen
from masksd.backends.taps import flatten_tensors

__all__ = ["DEPENDS", "FusionProbe", "MODALITIES", "OTHER"]

MODALITIES: tuple[Modality, Modality] = ("image", "text")
OTHER: dict[str, Modality] = {"image": "text", "text": "image"}
DEPENDS = {  # declared fusion -> (image depends on text, text depends on image)
    "late": (False, False),
    "text->image": (True, False),
    "image->text": (False, True),
    "bidirectional": (True, True),
}


def _fusion_name(image_on_text: bool, text_on_image: bool) -> str:
    """The ``HookSpec.fusion`` name of a dependency pair (the inverse of ``DEPENDS``)."""
    return {v: k for k, v in DEPENDS.items()}[(image_on_text, text_on_image)]


class FusionProbe:
    """Mixin of ``HookBackend``: ``probe`` and ``fusion`` (uses the backend's hooks and state)."""

    def probe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, bool | None]:
        """Find which modality depends on which (see the module docstring); cached."""
        if self.depends is not None:
            return self.depends
        with torch.random.fork_rng(devices=rng_devices(self.model)), running_stats_frozen(self.model):
            self._leaves.clear()
            self._cache.clear()
            self._forward("probe", args, kwargs)
            captured = {key: list(values) for key, values in self._values.items()}
            depends: dict[str, bool | None] = {}
            for m in self._modalities:
                other = OTHER[m]
                if other not in self._leaves:
                    depends[m] = None
                    continue
                if self._reuse[m]:
                    values = [v for path, _ in self._reuse[m] for v in self._cache.get(path, [])]
                else:
                    tap = self.spec.modality(m).tokens
                    values = captured.get((tap.module, tap.kind), []) if tap is not None else []
                tensors = [t for t in flatten_tensors(values) if t.requires_grad]
                if not tensors:  # features that need no gradient at all depend on nothing
                    depends[m] = None if not values else False
                    continue
                total = torch.stack([t.float().sum() for t in tensors]).sum()
                grad = torch.autograd.grad(total, self._leaves[other], allow_unused=True, retain_graph=True)[0]
                depends[m] = grad is not None
        self._leaves.clear()
        self._cache.clear()
        self.depends = depends
        return depends

    def fusion(self) -> str:
        """``"late"``, ``"text->image"``, ``"image->text"`` or ``"bidirectional"`` (after the probe)."""
        depends = self.depends or {}
        if any(depends.get(m) is None for m in MODALITIES):
            return "unknown (declare reuse modules or scoring taps for both modalities to probe it)"
        return _fusion_name(bool(depends["image"]), bool(depends["text"]))

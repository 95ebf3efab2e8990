"""The hook backend's masked branches (``MaskedBranches``, a mixin of ``HookBackend``).

A masked branch re-runs the model's forward with the masked modality's embedding output
replaced (the embed hook does that while ``_masked`` is set); where fusion allows, the other
modality's ``reuse`` modules are skipped: their ``forward`` is replaced by a ``Replay`` of their
main-branch outputs for the duration of the branch, then restored. With
``DistillConfig(dropout="replay")`` the branch also replays the main branch's random draws
(``masksd.backends.rng``): it starts from the generators' state at the main branch's start, and
after each skipped module it jumps to the state that module's main-branch call left behind.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from masksd.backends.base import Modality
from masksd.backends.hook_probe import OTHER
from masksd.backends.rng import RngTape
from masksd.backends.taps import Replay

__all__ = ["MaskedBranches"]

MAIN_START = "main start"


def reuse_point(path: str, call: int) -> str:
    """The name of the generator state after call ``call`` (0-based) of reuse module ``path``."""
    return f"after {path} #{call}"


class MaskedBranches:
    """``reuse_allowed`` / ``run_masked`` of ``HookBackend`` (see the module docstring)."""

    rng_tape: RngTape | None

    def reuse_allowed(self, masked: Modality) -> bool:
        """Whether the other modality's reuse modules may be skipped when ``masked`` is masked."""
        other = OTHER[masked]
        return other in self._modalities and bool(self._reuse[other]) and (self.depends or {}).get(other) is False  # type: ignore[attr-defined]

    def run_masked(self, modality, masked, mask_token, *, decoder=None):  # type: ignore[no-untyped-def]
        """Logits ``[B, 1, h, w]`` of a forward with ``masked [B, N]`` tokens of ``modality``
        replaced by ``mask_token [C]`` (None: unmasked)."""
        if decoder is not None:
            raise ValueError("share_decoder=False needs the tower backend; a hooked model has one decoder")
        output = self._masked_forward(modality, masked, mask_token)
        logits = self._logits(output, f"the masked-{modality} branch")  # type: ignore[attr-defined]
        if torch.is_grad_enabled() and not logits.requires_grad:
            raise ValueError(
                f"HookSpec.logits gives a tensor with no gradient in the masked-{modality} branch (does the "
                "model return a detached prediction in training?); tap the module that produces the "
                "logits instead: HookSpec(logits=Tap('<module path>'))"
            )
        return logits

    def _masked_forward(self, modality: Modality, masked: Tensor, mask_token: Tensor | None) -> Any:
        """The model's forward with ``masked`` tokens of ``modality`` replaced, reusing the other
        modality's modules where fusion allows; returns the model's output."""
        if self._main is None:  # type: ignore[attr-defined]
            raise RuntimeError("run_masked() called before run_main()")
        args, kwargs = self._main_inputs  # type: ignore[attr-defined]
        replays: list[tuple[nn.Module, Any]] = []
        if self.reuse_allowed(modality):
            for path, module in self._reuse[OTHER[modality]]:  # type: ignore[attr-defined]
                replays.append((module, module.__dict__.get("forward")))
                module.forward = Replay(path, self._cache.get(path, []))  # type: ignore[attr-defined, method-assign]
        self._masked, self._mask, self._token = modality, masked, mask_token
        tape = self.rng_tape
        try:
            with tape.branch(MAIN_START) if tape is not None else nullcontext():
                output = self._forward("masked", args, kwargs)  # type: ignore[attr-defined]
        finally:
            for module, saved in replays:
                del module.forward
                if saved is not None:
                    module.forward = saved  # type: ignore[method-assign]
            self._masked, self._mask, self._token = None, None, None
        return output

    def _replay_rng_at_reuse(self, path: str, module: nn.Module, main: bool) -> None:
        """Record (main branch) or restore (a branch that skipped the module) the generator state
        after a call of reuse module ``path``."""
        tape = self.rng_tape
        if tape is None:
            return
        if main:
            tape.record(reuse_point(path, len(self._cache.get(path, [])) - 1))  # type: ignore[attr-defined]
        else:
            replay = module.__dict__.get("forward")
            if isinstance(replay, Replay):
                tape.restore(reuse_point(path, replay.calls - 1))

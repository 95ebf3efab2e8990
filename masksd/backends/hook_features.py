"""What the hook backend serves to objectives beyond LMVSD/VMLSD (``HookCapabilities``).

A mixin of ``HookBackend`` (kept apart so that ``hooks.py`` stays about running the model):

* ``token_ids()``: the forward argument named by ``HookSpec.text.maskable.ids``;
* ``word_embedding()``: the weight of ``HookSpec.text.embed`` when that module is an
  ``nn.Embedding`` (the model's own parameter, fetched at every call);
* ``encoded_with_grad(m)``: the declared scoring taps of the main branch, recomputed from the
  captured values *with* their autograd graph (the engine's own ``Encoded`` are detached);
* ``fused()``: the ``HookSpec.fused`` tap of the main branch's one forward;
* ``encode_masked(m, masked, token)``: a forward with ``masked`` tokens of ``m`` replaced, which
  stops as soon as the scoring taps it needs have fired (usually before the decoder runs). The
  other modality's features come from that same forward when they depend on ``m`` (early
  fusion: the main branch's would leak the unmasked input), from the main branch otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from masksd.adapters.clip_dense import STEP_PREFIX as DENSE_STEP
from masksd.backends.base import MainBranch, Modality, check_ids
from masksd.backends.taps import layout_grid, resolve_module, resolve_tensor, to_bnc
from masksd.towers import Encoded, Fused

if TYPE_CHECKING:
    from masksd.spec import HookSpec

__all__ = ["HookCapabilities", "StopForward"]

OTHER: dict[str, Modality] = {"image": "text", "text": "image"}


class StopForward(BaseException):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside a tap hook to end a features-only forward early (a BaseException, so that a
    model's own ``except Exception`` cannot swallow it)."""


class HookCapabilities:
    """Optional capabilities of ``HookBackend`` (see the module docstring)."""

    spec: HookSpec
    model: nn.Module
    depends: dict[str, bool | None] | None
    _main: MainBranch | None
    _main_inputs: tuple[tuple[Any, ...], dict[str, Any]]
    _main_values: dict[tuple[str, str], list[Any]]
    _values: dict[tuple[str, str], list[Any]]
    _stop: dict[tuple[str, str], int] | None
    # also used from HookBackend: _bind, _tap, _encoded, _masked_forward

    def _main_branch(self) -> MainBranch:
        if self._main is None:
            raise RuntimeError("the main branch has not run in this training step")
        return self._main

    def _check_stop(self) -> None:
        """Called by the tap hooks: end the forward once every awaited tap has fired enough."""
        if self._stop and all(len(self._values[key]) >= count for key, count in self._stop.items()):
            raise StopForward

    def token_ids(self) -> Tensor:
        embedded = self._main_branch().embedded["text"]
        name = self.spec.modality("text").maskable.ids
        ids = embedded.extras.get("ids")
        if ids is not None:
            return check_ids(ids, embedded.maskable, "Embedded.extras['ids']")
        if name is None:
            raise TypeError(
                "the text tokens carry no ids: put them in Embedded.extras['ids'] in the tower's embed(), or "
                "name the forward argument that holds the token ids [B, L] in HookSpec.text.maskable.ids, "
                "e.g. Maskable(ids='input_ids', never=(pad_id, ...)) (objectives that read token_ids need one)"
            )
        arguments = self._bind(*self._main_inputs)
        if name not in arguments:
            raise ValueError(f"HookSpec.text.maskable.ids: the forward call has no argument {name!r}")
        return check_ids(arguments[name], embedded.maskable, f"the forward argument {name!r}")

    def word_embedding(self) -> Tensor:
        text = self.spec.modality("text")
        if text.word_embedding is not None:
            return resolve_tensor(self.model, text.word_embedding, "HookSpec.text.word_embedding")
        path = text.embed
        module = resolve_module(self.model, path, "HookSpec.text.embed")
        if not isinstance(module, nn.Embedding):
            raise TypeError(
                f"HookSpec.text.embed {path!r} is a {type(module).__name__}, not an nn.Embedding, so it holds "
                "no input-embedding matrix to tie to; point HookSpec.text.embed at the word-embedding table "
                "(e.g. 'bert.embeddings.word_embeddings') or set ModalitySpec(word_embedding=...)"
            )
        return module.weight

    def encoded_with_grad(self, modality: Modality) -> Encoded | None:
        main = self._main_branch()
        if modality not in main.embedded:
            return None
        tap = self.spec.modality(modality).tokens
        steps = () if tap is None or tap.project is None else (
            (tap.project,) if isinstance(tap.project, str) else tap.project)
        if any(step.startswith(DENSE_STEP) for step in steps):
            raise ValueError(
                f"HookSpec.{modality}.tokens is a dense scoring tap ({tap.project!r}), computed without gradient, "
                "and an objective asked for the encoder's features with their gradient (Mask Grounding, "
                "cross-modal alignment on encoder features): keep the plain tap for such objectives, or use the "
                "tower adapter's dense= (scorers only)"
            )
        return self._encoded(modality, main.embedded[modality], self._main_values, grad=True)

    def fused(self) -> Fused:
        tap = self.spec.fused
        if tap is None:
            raise TypeError(
                "HookSpec.fused is not set: declare a Tap on the decoder's fused features, e.g. "
                "HookSpec(fused=Tap('decoder.fuse', layout='bchw')); with towers, define "
                "forward_with_fused(image, text) -> (logits, fused) on the decoder (see docs/objectives.md)"
            )
        self._main_branch()
        raw = self._tap(tap, None, "HookSpec.fused", self._main_values)
        if isinstance(raw, Fused):
            return raw
        if not isinstance(raw, Tensor) or raw.dim() != (4 if tap.layout == "bchw" else 3):
            found = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
            raise ValueError(f"HookSpec.fused (layout {tap.layout!r}) gives {found}; check its module, select and layout")
        return Fused(tokens=to_bnc(raw, tap.layout), grid=layout_grid(raw, tap.layout, None, square=True))

    def encode_masked(self, modality: Modality, masked: Tensor, mask_token: Tensor) -> dict[str, Encoded | None]:
        main = self._main_branch()
        other = OTHER[modality]
        fresh = [modality] + ([other] if other in main.embedded and (self.depends or {}).get(other) is not False else [])
        taps = [t for m in fresh for t in (self.spec.modality(m).tokens, self.spec.modality(m).global_) if t is not None]
        stop: dict[tuple[str, str], int] = {}
        for tap in taps:
            if tap.call is not None and tap.call < 0:  # counted from the end: the forward must finish
                stop = {}
                break
            key = (tap.module, tap.kind)
            stop[key] = max(stop.get(key, 0), (tap.call or 0) + 1)
        self._stop = stop or None
        try:
            self._masked_forward(modality, masked, mask_token)
        except StopForward:
            pass
        finally:
            self._stop = None
        result: dict[str, Encoded | None] = {m: self._encoded(m, main.embedded[m], grad=True) for m in fresh}
        if other not in result:
            result[other] = self.encoded_with_grad(other)
        return result

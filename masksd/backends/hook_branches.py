"""The hook backend's masked branches (``MaskedBranches``, a mixin of ``HookBackend``).

A masked branch re-runs the model's forward with the masked modality's embedding output
replaced (the embed hook does that while ``_masked`` is set); where fusion allows, the other
modality's ``reuse`` modules are skipped: their ``forward`` is replaced by a ``Replay`` of their
main-branch outputs for the duration of the branch, then restored. With
``DistillConfig(dropout="replay")`` the branch also replays the main branch's random draws
(``masksd.backends.rng``): it starts from the generators' state at the main branch's start, and
after each skipped module it jumps to the state that module's main-branch call left behind.

Full extra passes (MaskRIS, ``masksd.objectives.maskris``): ``run_corrupted`` calls the model with
the image and/or ids arguments replaced and every masking hook inert (only the taps record, for
``HookSpec.logits``); ``run_replaced`` replaces the embedding outputs of several modalities at
once (a joint pass: nothing is reused, the whole model runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from masksd.backends.base import Modality
from masksd.backends.hook_probe import OTHER
from masksd.backends.inputs import image_argument
from masksd.backends.rng import RngTape
from masksd.backends.taps import Replay
from masksd.towers import Embedded

__all__ = ["MaskedBranches"]

MAIN_START = "main start"


def reuse_point(path: str, call: int) -> str:
    """The name of the generator state after call ``call`` (0-based) of reuse module ``path``."""
    return f"after {path} #{call}"


@torch.compiler.disable
def _install_replays(
    reused: list[tuple[str, nn.Module]], cache: dict[str, list[Any]], replays: dict[str, Replay],
    embeds: dict[str, list[Any]] | None = None,
) -> list[tuple[nn.Module, Any]]:
    """Replace each reused module's ``forward`` by a ``Replay`` of its main-branch outputs; returns
    what ``_remove_replays`` restores. Run eagerly: under ``torch.compile`` of the wrapper, dynamo
    defers the ``setattr`` but not a traced ``del module.forward``, which then finds nothing.
    One ``Replay`` per module (kept in ``replays``), refilled at every step: compiled code guards
    on the object behind ``module.forward``, and a new one at every step would recompile it."""
    saved = []
    for path, module in reused:
        saved.append((module, module.__dict__.get("forward")))
        replay = replays.setdefault(path, Replay(path, []))
        outputs = (embeds or {}).get(path)
        replay.outputs, replay.calls = (outputs if outputs is not None else cache.get(path, [])), 0
        module.forward = replay  # type: ignore[method-assign]
    return saved


@torch.compiler.disable
def _remove_replays(saved: list[tuple[nn.Module, Any]]) -> None:
    """Give the modules of ``_install_replays`` their own ``forward`` back."""
    for module, forward in saved:
        replay = module.__dict__.pop("forward", None)
        if isinstance(replay, Replay):
            replay.outputs = []  # the main branch's outputs are not kept by the stand-in
        if forward is not None:
            module.forward = forward  # type: ignore[method-assign]


@torch.compiler.disable
def _swap_module(parent: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``parent.<name>`` (eagerly, as ``_install_replays``); returns the old one."""
    old = parent._modules[name]
    parent._modules[name] = module
    return old  # type: ignore[return-value]


class MaskedBranches:
    """``reuse_allowed`` / ``run_masked`` of ``HookBackend`` (see the module docstring)."""

    rng_tape: RngTape | None
    _replays: dict[str, Replay]  # reuse module path -> its one Replay (``_install_replays``)
    _replaced: dict[str, Tensor] | None = None  # run_replaced: modality -> [B, N, C] tokens

    def reuse_allowed(self, masked: Modality) -> bool:
        """Whether the other modality's reuse modules may be skipped when ``masked`` is masked."""
        other = OTHER[masked]
        return other in self._modalities and bool(self._reuse[other]) and (self.depends or {}).get(other) is False  # type: ignore[attr-defined]

    def run_masked(self, modality, masked, mask_token, *, decoder=None):  # type: ignore[no-untyped-def]
        """Logits ``[B, 1, h, w]`` of a forward with ``masked [B, N]`` tokens of ``modality``
        replaced by ``mask_token [C]`` (None: unmasked)."""
        if decoder is None:
            output = self._masked_forward(modality, masked, mask_token)
        else:
            path = self.spec.decoder  # type: ignore[attr-defined]
            owner, _, name = path.rpartition(".")
            parent = self.model.get_submodule(owner) if owner else self.model  # type: ignore[attr-defined]
            shared = _swap_module(parent, name, decoder)
            try:
                output = self._masked_forward(modality, masked, mask_token)
            finally:
                _swap_module(parent, name, shared)
        return self._branch_logits(output, f"the masked-{modality} branch")

    def _branch_logits(self, output: Any, where: str) -> Tensor:
        logits = self._logits(output, where)  # type: ignore[attr-defined]
        if torch.is_grad_enabled() and not logits.requires_grad:
            raise ValueError(
                f"HookSpec.logits gives a tensor with no gradient in {where} (does the "
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
        reused = self._reuse[OTHER[modality]] if self.reuse_allowed(modality) else []  # type: ignore[attr-defined]
        replays = _install_replays(self._with_embeds(reused, [modality]), self._cache, self._replays,  # type: ignore[attr-defined]
                                   self._embed_outputs)  # type: ignore[attr-defined]
        self._masked, self._mask, self._token = modality, masked, mask_token
        tape = self.rng_tape
        try:
            with tape.branch(MAIN_START) if tape is not None else nullcontext():
                output = self._forward("masked", args, kwargs)  # type: ignore[attr-defined]
        finally:
            _remove_replays(replays)
            self._masked, self._mask, self._token = None, None, None
        return output

    def _with_embeds(self, reused: list[tuple[str, nn.Module]], modalities: list[Modality]) -> list[tuple[str, nn.Module]]:
        """``reused`` plus the embed modules of ``modalities``: a branch replays their main-branch
        outputs (its inputs are the main branch's) and masks those, instead of embedding again."""
        embeds = [(path, module) for path, module in self._embed_modules.items()  # type: ignore[attr-defined]
                  if path in {self.spec.modality(m).embed for m in modalities}]  # type: ignore[attr-defined]
        paths = {path for path, _ in embeds}
        return [item for item in reused if item[0] not in paths] + embeds

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

    # ------------------------------------------------------------------ full extra passes
    def _input_name(self, modality: Modality, arguments: dict[str, Any]) -> str:
        """The forward argument carrying ``modality``'s raw input (``ModalitySpec.argument``;
        images: else the only floating 4-D tensor argument; ids: else ``Maskable.ids``)."""
        spec = self.spec  # type: ignore[attr-defined]
        if modality == "image":
            name = image_argument(spec, arguments)
            fix = "set ModalitySpec(argument=...) on HookSpec.image to the name of the image argument"
        else:
            text = spec.text
            name = (text.argument or text.maskable.ids) if text is not None else None
            fix = "set HookSpec.text with Maskable(ids='<ids argument>') or ModalitySpec(argument=...)"
        if name is None or name not in arguments:
            raise TypeError(f"cannot tell which forward argument holds the {modality} input ({fix}); "
                            f"the call has {sorted(arguments)}")
        return name

    def raw_input(self, modality: Modality) -> Tensor:
        """The main branch's image ``[B, C, H, W]`` or token ids ``[B, L]`` argument."""
        if self._main is None:  # type: ignore[attr-defined]
            raise RuntimeError("the main branch has not run in this training step")
        arguments = self._bind(*self._main_inputs)  # type: ignore[attr-defined]
        name = self._input_name(modality, arguments)
        value = arguments[name]
        if modality == "image" and not (isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 4):
            raise TypeError(
                f"the image argument {name!r} is {_describe(value)}, not a float [B, C, H, W] tensor; "
                "input-space corruption needs the image tensor (or use MaskRISConfig(mode='embedding'))"
            )
        integer = isinstance(value, Tensor) and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        if modality == "text" and not (integer and value.dim() == 2):
            raise TypeError(
                f"the text argument {name!r} is {_describe(value)}, not integer token ids [B, L]; input-space "
                "corruption replaces ids, so pass the ids, or use MaskRISConfig(mode='embedding') or text_ratio=0"
            )
        return value

    def special_ids(self) -> tuple[int, ...]:
        text = self.spec.text  # type: ignore[attr-defined]
        return tuple(text.maskable.never) if text is not None else ()

    def run_corrupted(self, image: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
        """Logits ``[B, 1, h, w]`` of the model called with the image / ids arguments replaced."""
        if self._main is None:  # type: ignore[attr-defined]
            raise RuntimeError("run_corrupted() called before run_main()")
        args, kwargs = self._main_inputs  # type: ignore[attr-defined]
        bound = self._signature.bind(*args, **kwargs)  # type: ignore[attr-defined]
        for modality, value in (("image", image), ("text", ids)):
            if value is not None:
                bound.arguments[self._input_name(modality, dict(bound.arguments))] = value  # type: ignore[arg-type]
        tape = self.rng_tape
        with tape.branch(MAIN_START) if tape is not None else nullcontext():
            output = self._forward("corrupted", tuple(bound.args), dict(bound.kwargs))  # type: ignore[attr-defined]
        return self._branch_logits(output, "the corrupted-input pass")

    def run_replaced(self, tokens: Mapping[Modality, Tensor]) -> Tensor:
        """Logits ``[B, 1, h, w]`` of a full forward with the embedding outputs of every modality in
        ``tokens`` replaced by the given ``[B, N, C]`` tensors."""
        main = self._main  # type: ignore[attr-defined]
        if main is None:
            raise RuntimeError("run_replaced() called before run_main()")
        for modality, value in tokens.items():
            expected = tuple(main.embedded[modality].tokens.shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"replacement {modality} tokens {tuple(value.shape)} must have the embedded shape {expected}")
        args, kwargs = self._main_inputs  # type: ignore[attr-defined]
        self._replaced = dict(tokens)
        replays = _install_replays(self._with_embeds([], list(tokens)), self._cache, self._replays,  # type: ignore[attr-defined]
                                   self._embed_outputs)  # type: ignore[attr-defined]
        tape = self.rng_tape
        try:
            with tape.branch(MAIN_START) if tape is not None else nullcontext():
                output = self._forward("replaced", args, kwargs)  # type: ignore[attr-defined]
        finally:
            _remove_replays(replays)
            self._replaced = None
        return self._branch_logits(output, "the joint replaced-token pass")

    def _replacement(self, modality: Modality) -> Tensor | None:
        """The embed hook's output in ``run_replaced``: the given tokens in the model's layout."""
        tokens = (self._replaced or {}).get(modality)
        if tokens is None:
            return None
        main = self._embedded[modality]  # type: ignore[attr-defined]
        if isinstance(main, Embedded):
            return main.with_tokens(tokens.to(main.tokens.dtype))
        raw = main
        layout = self.spec.modality(modality).layout  # type: ignore[attr-defined]
        if layout == "bchw":
            tokens = rearrange(tokens, "b (h w) c -> b c h w", h=raw.shape[-2], w=raw.shape[-1])
        elif layout == "nbc":
            tokens = rearrange(tokens, "b n c -> n b c")
        elif layout == "bcn":
            tokens = rearrange(tokens, "b n c -> b c n")
        return tokens.to(raw.dtype)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"

"""``HookBackend``: drives an unchanged ``nn.Module`` through forward hooks (see ``HookSpec``).

Hooks are registered once, at wrap time, and are inert unless the backend is running a
training branch (a Python mode flag), so inference is the bare model bit for bit.

* Main branch: the model runs unchanged; the hooks record the embedding outputs, the outputs of
  the ``reuse`` modules and the taps (logits, scoring features).
* Masked branch: the embedding hook of the masked modality returns
  ``where(masked, mask_token, E_main)``; where fusion allows it, the other modality's ``reuse``
  modules are skipped and return their main-branch outputs (their forward is replaced for the
  duration of the branch, then restored), so a late-fusion model does not re-encode it.
* Fusion probe (once, before the first main branch, unless ``HookSpec.fusion`` says it): the
  embedding outputs become leaves that require grad, and autograd tells whether each
  modality's ``reuse`` outputs (or its scoring tokens) depend on the other modality's tokens.
"""

from __future__ import annotations

import inspect
from collections import Counter
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from masksd.backends.base import (
    MainBranch,
    Modality,
    as_tensor_loss,
    check_logits,
)
from masksd.backends.hook_branches import MAIN_START, MaskedBranches, reuse_point
from masksd.backends.hook_features import HookCapabilities
from masksd.backends.hook_probe import DEPENDS, MODALITIES, OTHER, FusionProbe
from masksd.backends.inputs import hook_batch_sizes
from masksd.backends.rng import RngTape
from masksd.backends.taps import (
    Replay,
    captured,
    expand_patterns,
    flatten_tensors,
    infer_width,
    init_token,
    layout_grid,
    maskable_from_rule,
    project,
    refuse_checkpointed_embedding,
    refuse_wrapped,
    replace_in_layout,
    resolve_module,
    spec_taps,
    tap_label,
    to_bnc,
    with_tokens,
)
from masksd.spec import HookSpec, Output, Tap, apply_selector
from masksd.torch_compat import is_compiling
from masksd.towers import Embedded, Encoded

#: why a hooked module can look as if it did not run
NOT_FIRED_HINT = (
    " (is the module called through .forward() or a method? hooks fire on module calls only. Under "
    "torch.compile: dynamo does not guard on hooks (torch._dynamo.config.skip_nnmodule_hook_guards), so "
    "code compiled before masksd.wrap added them, or for another instance of this model class without "
    "them, runs without them: wrap first, then compile, in a fresh process. torch 2.1 runs the modules "
    "inside a compiled module without their hooks at all: use torch >= 2.2 there, or compile only modules "
    "that hold no hooked module)"
)

__all__ = ["HookBackend", "refuse_wrapped"]

class HookBackend(MaskedBranches, FusionProbe, HookCapabilities):
    """Backend of ``masksd.wrap(model, spec)`` (see the module docstring)."""

    def __init__(self, model: nn.Module, spec: HookSpec) -> None:
        refuse_wrapped(model)
        if not isinstance(spec, HookSpec):
            raise TypeError(f"spec must be a masksd.HookSpec, got {type(spec).__name__}")
        self.model, self.spec = model, spec
        self.rng_tape: RngTape | None = None  # set by the engine for DistillConfig(dropout="replay")
        self._signature = inspect.signature(model.forward)
        self._mode = "off"
        self._masked: Modality | None = None
        self._mask: Tensor | None = None
        self._token: Tensor | None = None
        self._calls: Counter[tuple[str, str]] = Counter()
        self.call_log: Counter[tuple[str, str]] = Counter()  # (run, module path) -> real calls
        self.replay_log: Counter[tuple[str, str]] = Counter()  # (run, module path) -> skipped calls
        self.tap_log: Counter[tuple[str, str]] = Counter()  # (run, tap label) -> values captured
        # the three logs count only while check() runs: in training, counters that grow every step
        # would make torch.compile guard on their values and recompile at every step
        self.logging = False
        self._tap_labels: dict[tuple[str, str], str] = {}
        self._watch: list[tuple[str, Tensor, int]] = []  # captured tensors and their versions
        self._main_inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self._run = "main"
        self._values: dict[tuple[str, str], list[Any]] = {}
        self._embedded: dict[str, Tensor] = {}
        self._leaves: dict[str, Tensor] = {}
        self._cache: dict[str, list[Any]] = {}  # reuse module path -> its main-branch outputs
        self._embed_outputs: dict[str, list[Any]] = {}  # embed module path -> its main-branch outputs
        self._replays: dict[str, Replay] = {}
        self._main: MainBranch | None = None
        self._main_values: dict[tuple[str, str], list[Any]] = {}  # the main branch's taps (objectives)
        self._stop: dict[tuple[str, str], int] | None = None  # taps that end a features-only forward
        self._modalities = [m for m in MODALITIES if getattr(spec, m) is not None]
        self._reuse = {
            m: expand_patterns(model, spec.modality(m).reuse, f"HookSpec.{m}.reuse") for m in self._modalities
        }
        self._reuse_paths = {path for m in self._modalities for path, _ in self._reuse[m]}
        self._embed_modules = {
            spec.modality(m).embed: resolve_module(model, spec.modality(m).embed, f"HookSpec.{m}.embed")
            for m in self._modalities
        }
        # modality -> its features depend on the other modality's tokens (None: unknown)
        self.depends: dict[str, bool | None] | None = None
        if spec.fusion != "auto":
            image_on_text, text_on_image = DEPENDS[spec.fusion]
            self.depends = {"image": image_on_text, "text": text_on_image}
        self._handles = self._register()

    # ------------------------------------------------------------------------ registration
    def _register(self) -> list[Any]:
        handles = []
        for m in self._modalities:
            spec = self.spec.modality(m)
            if spec.call is not None and spec.call < 0:
                raise ValueError(f"HookSpec.{m}.call must be >= 0 (which call of {spec.embed!r}), got {spec.call}")
            module = resolve_module(self.model, spec.embed, f"HookSpec.{m}.embed")
            handles.append(module.register_forward_hook(partial(self._on_embed, m)))
            for path, module in self._reuse[m]:
                handles.append(module.register_forward_hook(partial(self._on_reuse, path)))
        roles: dict[tuple[str, str], list[str]] = {}
        for role, tap in spec_taps(self.spec, self._modalities):
            roles.setdefault((tap.module, tap.kind), []).append(role)
        self._tap_labels = {key: tap_label(key, names) for key, names in roles.items()}
        for tap in self._taps():
            module = resolve_module(self.model, tap.module, f"Tap({tap.module!r})") if tap.module else self.model
            key = (tap.module, tap.kind)
            if key in self._values:
                continue
            self._values[key] = []
            if tap.kind == "input":
                handles.append(module.register_forward_pre_hook(partial(self._on_tap_input, key)))
            else:
                handles.append(module.register_forward_hook(partial(self._on_tap_output, key)))
        return handles

    def _taps(self) -> list[Tap]:
        return [tap for _, tap in spec_taps(self.spec, self._modalities)]

    def remove_hooks(self) -> None:
        """Remove every hook masksd registered on the model (the wrapper no longer trains it)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------------------- hooks
    def _count(self, role: str, path: str) -> int:
        index = self._calls[(role, path)]
        self._calls[(role, path)] += 1
        if path not in self._reuse_paths:  # a reuse module's own hook counts its calls
            self._log(self.call_log, path)
        return index

    def _log(self, counter: Counter[tuple[str, str]], name: str) -> None:
        """Count one event of this run in ``counter`` (only while ``check()`` runs: ``logging``)."""
        if self.logging:
            counter[(self._run, name)] += 1

    def _on_embed(self, modality: Modality, module: nn.Module, args: Any, output: Any) -> Any:
        if self._mode == "off":
            return None
        spec = self.spec.modality(modality)
        index = self._count("embed", spec.embed)
        if self._mode in ("main", "masked", "replaced"):
            self._embed_call(spec.embed, module, output)
        if index != (spec.call or 0):
            return None
        tokens = output.tokens if isinstance(output, Embedded) else output
        if not isinstance(tokens, Tensor) or not tokens.is_floating_point():
            raise TypeError(
                f"HookSpec.{modality}.embed {spec.embed!r} must output a floating tensor (or a masksd.Embedded), "
                f"got {type(output).__name__}; choose the module whose output is the embedded tokens"
            )
        if self._mode == "probe":
            self._leaves[modality] = tokens.detach().requires_grad_(True)
            return with_tokens(output, self._leaves[modality].clone())  # not a leaf: in-place ops stay legal
        if self._mode == "main":
            self._embedded[modality] = kept = self._embed_outputs[spec.embed][index]
            self._watch_in_place(f"HookSpec.{modality}.embed {spec.embed!r}", kept)
            return None
        if self._mode == "replaced":  # run_replaced (MaskRIS embedding mode); "corrupted": inert
            return self._replacement(modality)
        if self._masked != modality:
            return None
        refuse_checkpointed_embedding(modality, spec.embed)
        main = self._embedded[modality]
        if self._token is None:
            return main
        grid = self._main.embedded[modality].grid if self._main else None  # type: ignore[union-attr]
        raw = main.tokens if isinstance(main, Embedded) else main
        return with_tokens(main, replace_in_layout(raw, self._mask, self._token, spec.layout, grid))  # type: ignore[arg-type]

    def _embed_call(self, path: str, module: nn.Module, output: Any) -> None:
        """Main branch: keep every output of an embed module (a masked branch replays them instead of
        running the module again) and, for dropout replay, the generator state after it; a branch
        that replayed the module restores that state."""
        tape = self.rng_tape
        if self._mode == "main":
            outputs = self._embed_outputs.setdefault(path, [])
            outputs.append(captured(output))
            if tape is not None:
                tape.record(reuse_point(path, len(outputs) - 1))
            return
        replay = module.__dict__.get("forward")
        if tape is not None and isinstance(replay, Replay):
            tape.restore(reuse_point(path, replay.calls - 1))

    def _watch_in_place(self, name: str, kept: Any) -> None:
        """Remember the versions of a kept value's tensors, to refuse later in-place changes
        (eager only: under torch.compile the kept values are copies, ``taps.captured``)."""
        if not is_compiling():
            self._watch += [(name, t, t._version) for t in flatten_tensors(kept)]

    def _on_reuse(self, path: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._mode == "off":
            return
        replayed = isinstance(module.__dict__.get("forward"), Replay)
        self._log(self.replay_log if replayed else self.call_log, path)
        kept = captured(output)
        if self._mode in ("main", "probe"):
            self._cache.setdefault(path, []).append(kept)
        if self._mode == "main" or (self._mode == "masked" and replayed):
            self._replay_rng_at_reuse(path, module, main=self._mode == "main")
        if self._mode == "main":
            self._watch_in_place(f"reuse module {path!r}", kept)

    def _on_tap_input(self, key: tuple[str, str], module: nn.Module, args: Any) -> None:
        if self._mode != "off":
            self._values[key].append(captured(args))
            self._log(self.tap_log, self._tap_labels[key])
            self._check_stop()

    def _on_tap_output(self, key: tuple[str, str], module: nn.Module, args: Any, output: Any) -> None:
        if self._mode == "off":
            return
        kept = captured(output)
        self._values[key].append(kept)
        self._log(self.tap_log, self._tap_labels[key])
        if self._mode == "main":
            self._watch_in_place(f"tapped module {key[0]!r}", kept)
        self._check_stop()

    # -------------------------------------------------------------------------- contract
    def embed_width(self, modality: Modality) -> int:
        spec = self.spec.modality(modality)
        if spec.width is not None:
            return int(spec.width)
        width = infer_width(resolve_module(self.model, spec.embed, f"HookSpec.{modality}.embed"))
        if width is None:
            module = self.model.get_submodule(spec.embed)
            raise ValueError(
                f"cannot tell the output width of HookSpec.{modality}.embed {spec.embed!r} "
                f"({type(module).__name__}); set ModalitySpec(width=...) to its channel count"
            )
        return width

    def init_mask_token(self, modality: Modality, token: Tensor) -> None:
        init_token(self.model, self.spec.modality(modality).mask_token, token, f"HookSpec.{modality}.mask_token")

    def split_inputs(self, args, kwargs, target):  # type: ignore[override]
        name = self.spec.target
        if name is None:
            return args, kwargs, target
        if target is not None:
            if name in kwargs:
                raise TypeError(f"target given twice (target= and {name}=)")
            kwargs = {**kwargs, name: target}
        arguments = self._bind(args, kwargs)
        return args, kwargs, arguments.get(name)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(self._signature.bind(*args, **kwargs).arguments)
        except TypeError as error:
            raise TypeError(
                f"the wrapper's arguments do not fit {type(self.model).__name__}.forward{self._signature}: {error}"
            ) from None

    def batch_sizes(self, args, kwargs, target):  # type: ignore[override]
        return hook_batch_sizes(self.spec, self._bind(args, kwargs))

    def target_needed_by(self) -> str | None:
        if self.spec.target is None:
            return None
        return f"{type(self.model).__name__}.forward takes it as {self.spec.target!r}, HookSpec.target"

    def eval_forward(self, args, kwargs):  # type: ignore[override]
        return self.model(*args, **kwargs)

    # ---------------------------------------------------------------------------- running
    def _forward(self, mode: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._mode, self._run = mode, mode if mode != "masked" else f"masked {self._masked}"
        self._calls.clear()
        for values in self._values.values():
            values.clear()
        try:
            return self.model(*args, **kwargs)
        finally:
            self._mode = "off"

    def _tap(self, tap: Tap | Output, output: Any, where: str, source: dict[tuple[str, str], list[Any]] | None = None) -> Any:
        if isinstance(tap, Output):
            return apply_selector(output, tap.select, where=f"{where} (the model's output)")
        values = (self._values if source is None else source)[(tap.module, tap.kind)]
        if not values:
            raise ValueError(f"{where}: module {tap.module!r} did not run in this forward{NOT_FIRED_HINT}")
        if tap.call is None and len(values) > 1:
            raise ValueError(
                f"{where}: module {tap.module!r} ran {len(values)} times; set Tap(call=...) to pick one"
            )
        return apply_selector(values[tap.call or 0], tap.select, where=f"{where} ({tap.module!r} {tap.kind})")

    def _logits(self, output: Any, where: str) -> Tensor:
        return check_logits(self._tap(self.spec.logits, output, "HookSpec.logits"), two_class=self.spec.two_class, where=where)

    def run_main(self, args, kwargs, target):  # type: ignore[override]
        self.probe(args, kwargs)
        self._cache.clear()
        self._embed_outputs.clear()
        self._embedded.clear()
        self._watch.clear()
        self._main_inputs = (args, kwargs)
        if self.rng_tape is not None:
            self.rng_tape.clear()
            self.rng_tape.record(MAIN_START)
        output = self._forward("main", args, kwargs)
        self._check_in_place()
        self._main_values = {key: list(values) for key, values in self._values.items()}
        arguments = self._bind(args, kwargs)
        raw_logits = self._tap(self.spec.logits, output, "HookSpec.logits")
        logits = check_logits(raw_logits, two_class=self.spec.two_class, where="the main branch")
        model_loss = as_tensor_loss(apply_selector(output, self.spec.loss, where="HookSpec.loss"), "HookSpec.loss") if self.spec.loss is not None else None
        main = MainBranch(logits=logits, target=target, model_loss=model_loss, output=output, raw_logits=raw_logits)
        for m in self._modalities:
            main.embedded[m] = self._embedded_view(m, arguments)
        for m in self._modalities:
            main.encoded[m] = self._encoded(m, main.embedded[m])
        self._main = main
        return main

    def _embedded_view(self, modality: Modality, arguments: dict[str, Any]) -> Embedded:
        spec = self.spec.modality(modality)
        fired = self._calls[("embed", spec.embed)]
        if modality not in self._embedded or (spec.call is None and fired != 1):
            raise ValueError(
                f"HookSpec.{modality}.embed {spec.embed!r} ran {fired} times in the forward; "
                + ("it must run" if fired == 0 else "set ModalitySpec(call=...) to say which call holds the tokens, or hook a module that runs once")
                + ("" if fired else NOT_FIRED_HINT)
            )
        raw = self._embedded[modality]
        extras = {"layout": spec.layout, "units": spec.units}
        if isinstance(raw, Embedded):  # the module gives masksd's own record (the tower entry's sites)
            maskable = raw.maskable & maskable_from_rule(spec.maskable, arguments, raw.tokens, f"HookSpec.{modality}.maskable")
            embedded = Embedded(tokens=raw.tokens, maskable=maskable, grid=raw.grid, extras={**raw.extras, **extras})
        else:
            tokens = to_bnc(raw, spec.layout)
            grid = layout_grid(raw, spec.layout, spec.grid, square=modality == "image")
            maskable = maskable_from_rule(spec.maskable, arguments, tokens, f"HookSpec.{modality}.maskable")
            embedded = Embedded(tokens=tokens, maskable=maskable, grid=grid, extras=extras)
        return embedded

    def _check_in_place(self) -> None:
        for name, tensor, version in self._watch:
            if tensor._version != version:
                raise ValueError(
                    f"the output of {name} was modified in place by a later op (an inplace ReLU or +=?); "
                    "masksd would read or reuse changed values: hook the module after that op"
                )
        self._watch.clear()

    def _encoded(
        self, modality: Modality, embedded: Embedded, source: dict[tuple[str, str], list[Any]] | None = None, *, grad: bool = False
    ) -> Encoded | None:
        """Scoring features from the taps (``source``: captured values, default the last forward's),
        detached unless ``grad``."""
        spec = self.spec.modality(modality)
        if spec.tokens is None and spec.global_ is None:
            return None
        where = f"HookSpec.{modality}"
        cut = (lambda t: t) if grad else Tensor.detach
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            tokens, grid = None, None
            if spec.tokens is not None:
                raw = self._tap(spec.tokens, None, f"{where}.tokens", source)
                if isinstance(raw, Encoded):  # masksd's own record (the tower entry): scorers detach
                    return raw
                tokens = cut(project(self.model, spec.tokens.project, to_bnc(raw, spec.tokens.layout)))
                aligned = tokens.shape[1] == embedded.tokens.shape[1]
                grid = embedded.grid if aligned else layout_grid(raw, spec.tokens.layout, None, square=modality == "image")
            if spec.global_ is not None:
                pooled = self._tap(spec.global_, None, f"{where}.global_", source)
                pooled = cut(project(self.model, spec.global_.project, pooled))
            elif tokens.shape[1] == embedded.maskable.shape[1]:  # type: ignore[union-attr]
                weights = embedded.maskable.to(tokens.dtype)[..., None]  # type: ignore[union-attr]
                pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # type: ignore[operator]
            else:
                pooled = tokens.mean(1)  # type: ignore[union-attr]
            if tokens is None:
                tokens = pooled[:, None]
        return Encoded(tokens=tokens, global_feature=pooled, grid=grid, features={"declared_tokens": spec.tokens is not None})

    def release(self) -> None:
        self._main = None
        self._main_inputs = ((), {})
        self._main_values = {}
        self._watch.clear()
        self._embedded.clear()
        self._cache.clear()
        self._embed_outputs.clear()
        for values in self._values.values():
            values.clear()

    def reuse_paths(self) -> list[str]:
        """The ``reuse`` modules' paths (both modalities), as the spec's patterns expanded."""
        return [path for m in self._modalities for path, _ in self._reuse[m]]

    def describe(self) -> dict[str, Any]:
        passes = {}
        for name, m in (("lmvsd", "image"), ("vmlsd", "text")):
            if m not in self._modalities:
                continue
            other = OTHER[m]
            skipped = [p for p, _ in self._reuse.get(other, [])] if self.reuse_allowed(m) else []
            passes[name] = f"skips {skipped} (reused from the main branch)" if skipped else "full forward"
        return {"backend": "hooks", "fusion": self.fusion() if self.depends is not None else "not probed yet",
                "depends": dict(self.depends or {}), "passes": passes}

"""``Runner``: runs the model for the engine: the main branch, and every extra pass as one primitive.

* ``run_main`` runs the bare model once through the ``Recorder`` and returns the step's ``Step``
  (``masksd.step``): logits, target, per modality the embedded tokens, the scoring features and
  the units.
* ``rerun(step, ...)`` runs the model again with, as options, some modalities' embedded tokens
  masked (``mask=``; the other modality's ``reuse`` modules are skipped where fusion allows:
  LMVSD, VMLSD), replaced (``tokens=``; MaskRIS in embedding mode) or its raw inputs replaced
  (``inputs=``; MaskRIS in input mode), with a private decoder swapped in (``decoder=``,
  ``share_decoder=False``); ``stop_at_features=True`` ends it once the scoring taps fired
  (Mask Grounding) and returns those features instead of logits.
* What objectives read beyond the ``Step``: ``token_ids``, ``word_embedding``,
  ``encoded_with_grad``, ``fused``, ``raw_input``, ``special_ids``; each raises an error naming the
  spec field the model must provide.
* The fusion probe (once, before the first main branch, unless ``HookSpec.fusion`` declares it):
  the embedding outputs become leaves that require grad, and autograd tells whether each
  modality's ``reuse`` outputs (or its scoring tokens) depend on the other modality's tokens.
  A modality that does not depend on the other may be skipped in the branch that masks the
  other; otherwise that branch is a full forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from masksd.engine.inputs import image_argument
from masksd.engine.outputs import as_tensor_loss, check_ids, check_logits
from masksd.engine.plan import (
    DEPENDS,
    Plan,
    init_token,
    project,
    projection_steps,
    registered_step,
    resolve_module,
)
from masksd.engine.plan import resolve_tensor as plan_tensor
from masksd.engine.recorder import Recorder, Replacement, Run, StopForward, flatten_tensors, swap_module
from masksd.engine.rng import RngTape, rng_devices, running_stats_frozen
from masksd.layouts import layout_grid, to_bnc
from masksd.spec import HookSpec, Maskable, Output, Tap, apply_selector
from masksd.step import Modality, Step, View, other, units_of
from masksd.towers import Embedded, Encoded, Fused

__all__ = ["MAIN_START", "Runner"]

MAIN_START = "main start"  # the generator state a replayed-dropout branch starts from

#: why a hooked module can look as if it did not run
NOT_FIRED_HINT = (
    " (is the module called through .forward() or a method? hooks fire on module calls only. Under "
    "torch.compile: dynamo does not guard on hooks (torch._dynamo.config.skip_nnmodule_hook_guards), so "
    "code compiled before masksd.wrap added them, or for another instance of this model class without "
    "them, runs without them: wrap first, then compile, in a fresh process. torch 2.1 runs the modules "
    "inside a compiled module without their hooks at all: use torch >= 2.2 there, or compile only modules "
    "that hold no hooked module)"
)


class Runner:
    """Runs ``model`` as ``spec`` describes it (see the module docstring).

    Attributes:
        plan: the spec compiled against the model (``masksd.engine.plan``).
        recorder: the hooks (``masksd.engine.recorder``).
        depends: modality -> whether its features depend on the other modality's tokens (None:
            unknown), declared by ``HookSpec.fusion`` or found by the probe; None before it.
    """

    def __init__(self, model: nn.Module, spec: HookSpec) -> None:
        self.plan = Plan.compile(model, spec)
        self.model, self.spec = model, spec
        self.recorder = Recorder(self.plan)
        self.depends: dict[str, bool | None] | None = self.plan.declared

    # --------------------------------------------------------------------------- set-up
    def width(self, modality: str) -> int:
        """Width C of ``modality``'s embedded tokens (the size of its mask token)."""
        return self.plan.width(modality)

    def init_mask_token(self, modality: str, token: Tensor) -> None:
        """Initialise ``token [C]`` in place as ``ModalitySpec.mask_token`` says."""
        init_token(self.model, self.plan.part(modality).mask_token, token, f"HookSpec.{modality}.mask_token")

    # ------------------------------------------------------------------------------ fusion
    def probe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, bool | None]:
        """Find which modality depends on which (see the module docstring); cached."""
        if self.depends is not None:
            return self.depends
        run = Run("probe", probe=True)
        with torch.random.fork_rng(devices=rng_devices(self.model)), running_stats_frozen(self.model):
            self.recorder.forward(run, args, kwargs)
            depends: dict[str, bool | None] = {}
            for m in self.plan.modalities:
                leaf = run.embedded.get(other(m))
                if leaf is None:
                    depends[m] = None
                    continue
                if self.plan.reuse[m]:
                    values = [v for path, _ in self.plan.reuse[m] for v in run.reuse_outputs.get(path, [])]
                else:
                    tap = self.plan.part(m).tokens
                    values = run.values.get((tap.module, tap.kind), []) if tap is not None else []
                tensors = [t for t in flatten_tensors(values) if t.requires_grad]
                if not tensors:  # features that need no gradient at all depend on nothing
                    depends[m] = None if not values else False
                    continue
                total = torch.stack([t.float().sum() for t in tensors]).sum()
                depends[m] = (
                    torch.autograd.grad(total, leaf, allow_unused=True, retain_graph=True)[0] is not None
                )
        self.depends = depends
        return depends

    def fusion(self) -> str:
        """``"late"``, ``"text->image"``, ``"image->text"`` or ``"bidirectional"`` (after the probe)."""
        depends = self.depends or {}
        if any(depends.get(m) is None for m in ("image", "text")):
            return "unknown (declare reuse modules or scoring taps for both modalities to probe it)"
        pair = (bool(depends["image"]), bool(depends["text"]))
        return next(name for name, value in DEPENDS.items() if value == pair)

    def reuse_allowed(self, masked: str) -> bool:
        """Whether the other modality's reuse modules may be skipped when ``masked`` is masked."""
        theirs = other(masked)
        return bool(self.plan.reuse.get(theirs)) and (self.depends or {}).get(theirs) is False

    def describe(self) -> dict[str, Any]:
        """Facts for the wrap-time report: fusion, what each branch re-runs."""
        passes = {}
        for name, m in (("lmvsd", "image"), ("vmlsd", "text")):
            if m in self.plan.modalities:
                skipped = [p for p, _ in self.plan.reuse.get(other(m), [])] if self.reuse_allowed(m) else []
                passes[name] = f"skips {skipped} (reused from the main branch)" if skipped else "full forward"
        return {"fusion": self.fusion() if self.depends is not None else "not probed yet",
                "depends": dict(self.depends or {}), "passes": passes}

    # -------------------------------------------------------------------------- main branch
    def run_main(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Tensor | None, *,
        generator: torch.Generator | None = None, tape: RngTape | None = None,
    ) -> Step:
        """One training forward of the bare model, recorded into the step's ``Step``."""
        self.probe(args, kwargs)
        run = Run("main", record=True, tape=tape)
        if tape is not None:
            tape.clear()
            tape.record(MAIN_START)
        output = self.recorder.forward(run, args, kwargs)
        for name, tensor, version in run.watch:
            if tensor._version != version:
                raise ValueError(
                    f"the output of {name} was modified in place by a later op (an inplace ReLU or +=?); "
                    "masksd would read or reuse changed values: hook the module after that op"
                )
        run.watch.clear()
        raw_logits = self._tap(self.spec.logits, output, run, "HookSpec.logits")
        logits = check_logits(raw_logits, two_class=self.spec.two_class, where="the main branch")
        loss = None
        if self.spec.loss is not None:
            loss = as_tensor_loss(
                apply_selector(output, self.spec.loss, where="HookSpec.loss"), "HookSpec.loss"
            )
        step = Step(model=self.model, logits=logits, raw_logits=raw_logits, target=target, output=output,
                    model_loss=loss, generator=generator, inputs=(args, kwargs), record=run)
        arguments = self.plan.bind(args, kwargs)
        for m in self.plan.modalities:
            embedded = self._embedded(m, run, arguments)
            encoded = self._encoded(m, embedded, run)
            part = self.plan.part(m)
            declared = part.tokens is not None
            units = units_of(m, embedded, encoded, declared=part.units, tokens_declared=declared)
            step.views[m] = View(embedded=embedded, encoded=encoded, units=units, tokens_declared=declared)
        return step

    def _embedded(self, modality: Modality, run: Run, arguments: dict[str, Any]) -> Embedded:
        part = self.plan.part(modality)
        fired = run.calls[("embed", part.embed)]
        if modality not in run.embedded or (part.call is None and fired != 1):
            raise ValueError(
                f"HookSpec.{modality}.embed {part.embed!r} ran {fired} times in the forward; "
                + ("it must run" if fired == 0 else "set ModalitySpec(call=...) to say which call holds the "
                   "tokens, or hook a module that runs once")
                + ("" if fired else NOT_FIRED_HINT)
            )
        raw = run.embedded[modality]
        where = f"HookSpec.{modality}.maskable"
        if isinstance(raw, Embedded):  # the module gives masksd's own record (the tower entry's sites)
            maskable = raw.maskable & maskable_from_rule(part.maskable, arguments, raw.tokens, where)
            return Embedded(tokens=raw.tokens, maskable=maskable, grid=raw.grid, extras=raw.extras)
        tokens = to_bnc(raw, part.layout)
        grid = layout_grid(raw, part.layout, part.grid, square=modality == "image")
        return Embedded(
            tokens=tokens, maskable=maskable_from_rule(part.maskable, arguments, tokens, where), grid=grid
        )

    def _encoded(
        self, modality: Modality, embedded: Embedded, run: Run, *, grad: bool = False
    ) -> Encoded | None:
        """Scoring features from the taps of ``run``, detached unless ``grad``."""
        part = self.plan.part(modality)
        if part.tokens is None and part.global_ is None:
            return None
        where = f"HookSpec.{modality}"
        cut = (lambda t: t) if grad else Tensor.detach
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            tokens, grid = None, None
            if part.tokens is not None:
                raw = self._tap(part.tokens, None, run, f"{where}.tokens")
                if isinstance(raw, Encoded):  # masksd's own record (the tower entry): scorers detach
                    return raw
                tokens = cut(project(self.model, part.tokens.project, to_bnc(raw, part.tokens.layout)))
                aligned = tokens.shape[1] == embedded.tokens.shape[1]
                grid = (embedded.grid if aligned
                        else layout_grid(raw, part.tokens.layout, None, square=modality == "image"))
            if part.global_ is not None:
                pooled = cut(project(self.model, part.global_.project,
                                     self._tap(part.global_, None, run, f"{where}.global_")))
            elif tokens is not None and tokens.shape[1] == embedded.maskable.shape[1]:
                weights = embedded.maskable.to(tokens.dtype)[..., None]
                pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
            else:
                assert tokens is not None
                pooled = tokens.mean(1)
        return Encoded(tokens=pooled[:, None] if tokens is None else tokens, global_feature=pooled, grid=grid)

    def _tap(self, tap: Tap | Output, output: Any, run: Run, where: str) -> Any:
        if isinstance(tap, Output):
            return apply_selector(output, tap.select, where=f"{where} (the model's output)")
        values = run.values[(tap.module, tap.kind)]
        if not values:
            raise ValueError(f"{where}: module {tap.module!r} did not run in this forward{NOT_FIRED_HINT}")
        if tap.call is None and len(values) > 1:
            raise ValueError(
                f"{where}: module {tap.module!r} ran {len(values)} times; set Tap(call=...) to pick one"
            )
        return apply_selector(values[tap.call or 0], tap.select, where=f"{where} ({tap.module!r} {tap.kind})")

    # --------------------------------------------------------------------------- extra passes
    def rerun(
        self, step: Step, *, mask: Mapping[str, tuple[Tensor, Tensor | None]] | None = None,
        tokens: Mapping[str, Tensor] | None = None, inputs: Mapping[str, Tensor] | None = None,
        decoder: nn.Module | None = None, stop_at_features: bool = False,
    ) -> Any:
        """Run the model again after the main branch of ``step`` (see the module docstring).

        Args:
            mask: modality -> ``(masked [B, N] bool, mask_token [C] or None)``: those embedded
                tokens replaced by the token (None: unmasked). With one modality masked, the other
                modality's ``reuse`` modules are skipped where fusion allows.
            tokens: modality -> ``[B, N, C]`` embedded tokens replacing the main branch's (the
                ``Embedded.tokens`` view; put back into the model's layout). Nothing is reused.
            inputs: ``{"image": [B, C, H, W], "text": [B, L] ids}``: the raw forward arguments
                replaced (``ModalitySpec.argument``); no token of masksd's is replaced.
            decoder: a private copy of ``HookSpec.decoder``, swapped in for this pass.
            stop_at_features: end the pass once the masked modalities' scoring taps (and the
                other modality's, where it depends on them) fired; return those features.

        Returns:
            The pass's logits ``[B, 1, h, w]``, or with ``stop_at_features`` a dict modality ->
            ``Encoded`` (with gradients) as the decoder would see them in that pass.
        """
        if inputs and (mask or tokens):
            raise ValueError(
                "rerun: give inputs= (raw inputs replaced) or mask=/tokens= (embedded tokens), not both"
            )
        record: Run = step.record
        args, kwargs = step.inputs
        masked = dict(mask or {})
        replace = {m: Replacement(masked=mk, token=tok) for m, (mk, tok) in masked.items()}
        for m, value in (tokens or {}).items():
            expected = tuple(step.embedded(m).tokens.shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"replacement {m} tokens {tuple(value.shape)} must have the embedded shape {expected}"
                )
            replace[m] = Replacement(tokens=value)
        replays = [self.plan.embeds[m][0] for m in replace]
        label = "replaced"
        if len(masked) == 1 and not tokens:
            (m,) = masked
            label = f"masked {m}"
            if self.reuse_allowed(m):
                replays += [path for path, _ in self.plan.reuse[other(m)] if path not in replays]
        if inputs:
            args, kwargs = self._with_inputs(step, inputs)
            label = "corrupted"
        run = Run(label, replace=replace, replays=tuple(replays), main=record, tape=record.tape)
        if stop_at_features:
            run.stop = self._feature_stops([*masked, *(tokens or {})], step)
        swapped = self._swap_decoder(decoder) if decoder is not None else None
        tape = record.tape
        try:
            with tape.branch(MAIN_START) if tape is not None else nullcontext():
                output = self.recorder.forward(run, args, kwargs)
        except StopForward:
            output = None
        finally:
            if swapped is not None:
                swap_module(*swapped)
        if stop_at_features:
            return self._features(step, run, [*masked, *(tokens or {})])
        logits = check_logits(self._tap(self.spec.logits, output, run, "HookSpec.logits"),
                              two_class=self.spec.two_class, where=f"the {label} pass")
        if torch.is_grad_enabled() and not logits.requires_grad:
            raise ValueError(
                f"HookSpec.logits gives a tensor with no gradient in the {label} pass (does the model "
                "return a detached prediction in training?); tap the module that produces the logits "
                "instead: HookSpec(logits=Tap('<module path>'))"
            )
        return logits

    def _swap_decoder(self, decoder: nn.Module) -> tuple[nn.Module, str, nn.Module]:
        path = self.spec.decoder
        if path is None:
            raise ValueError("a private decoder needs HookSpec(decoder='<module path>')")
        owner, _, name = path.rpartition(".")
        parent = self.model.get_submodule(owner) if owner else self.model
        return parent, name, swap_module(parent, name, decoder)

    def _fresh(self, modalities: list[str], step: Step) -> list[str]:
        """The modalities whose features a pass that replaces ``modalities`` computes anew."""
        fresh = list(modalities)
        for m in modalities:
            theirs = other(m)
            if theirs in step.views and theirs not in fresh and (self.depends or {}).get(theirs) is not False:
                fresh.append(theirs)
        return fresh

    def _feature_stops(self, modalities: list[str], step: Step) -> dict[tuple[str, str], int] | None:
        stop: dict[tuple[str, str], int] = {}
        for m in self._fresh(modalities, step):
            for tap in (self.plan.part(m).tokens, self.plan.part(m).global_):
                if tap is None:
                    continue
                if tap.call is not None and tap.call < 0:  # counted from the end: the forward must finish
                    return None
                key = (tap.module, tap.kind)
                stop[key] = max(stop.get(key, 0), (tap.call or 0) + 1)
        return stop or None

    def _features(self, step: Step, run: Run, modalities: list[str]) -> dict[str, Encoded | None]:
        fresh = self._fresh(modalities, step)
        result = {m: self._encoded(m, step.embedded(m), run, grad=True) for m in fresh}  # type: ignore[arg-type]
        for m in step.views:
            if m not in result:
                result[m] = self.encoded_with_grad(step, m) if step.encoded(m) is not None else None
        return result

    def _with_inputs(
        self, step: Step, inputs: Mapping[str, Tensor]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        bound = self.plan.signature.bind(*step.inputs[0], **step.inputs[1])
        for modality, value in inputs.items():
            bound.arguments[self._input_name(modality, dict(bound.arguments))] = value
        return tuple(bound.args), dict(bound.kwargs)

    # ------------------------------------------------------------------ what objectives read
    def _input_name(self, modality: str, arguments: dict[str, Any]) -> str:
        """The forward argument carrying ``modality``'s raw input (``ModalitySpec.argument``;
        images: else the only floating 4-D tensor argument; ids: else ``Maskable.ids``)."""
        if modality == "image":
            name = image_argument(self.spec, arguments)
            fix = "set ModalitySpec(argument=...) on HookSpec.image to the name of the image argument"
        else:
            text = self.spec.text
            name = (text.argument or text.maskable.ids) if text is not None else None
            fix = "set HookSpec.text with Maskable(ids='<ids argument>') or ModalitySpec(argument=...)"
        if name is None or name not in arguments:
            raise TypeError(f"cannot tell which forward argument holds the {modality} input ({fix}); "
                            f"the call has {sorted(arguments)}")
        return name

    def raw_input(self, step: Step, modality: str) -> Tensor:
        """The main branch's images ``[B, C, H, W]`` (float) or token ids ``[B, L]`` (integer)."""
        arguments = self.plan.bind(*step.inputs)
        name = self._input_name(modality, arguments)
        value = arguments[name]
        if modality == "image" and not (
            isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 4
        ):
            raise TypeError(
                f"the image argument {name!r} is {_describe(value)}, not a float [B, C, H, W] tensor; "
                "input-space corruption needs the image tensor (or use MaskRISConfig(mode='embedding'))"
            )
        integer = isinstance(value, Tensor) and not (value.is_floating_point() or value.is_complex()
                                                     or value.dtype == torch.bool)
        if modality == "text" and not (integer and value.dim() == 2):
            raise TypeError(
                f"the text argument {name!r} is {_describe(value)}, not integer token ids [B, L]; "
                "input-space corruption replaces ids, so pass the ids, or use "
                "MaskRISConfig(mode='embedding') or text_ratio=0"
            )
        return value

    def special_ids(self) -> tuple[int, ...]:
        """Token ids the spec declares never maskable (``HookSpec.text.maskable.never``)."""
        return tuple(self.spec.text.maskable.never) if self.spec.text is not None else ()

    def token_ids(self, step: Step) -> Tensor:
        """Token ids ``[B, L]`` int64 lined up with the text's embedded tokens: the embedded
        record's ``extras["ids"]`` (towers), else the argument ``HookSpec.text.maskable.ids``."""
        embedded = step.embedded("text")
        ids = embedded.extras.get("ids")
        if ids is not None:
            return check_ids(ids, embedded.maskable, "Embedded.extras['ids']")
        name = self.plan.part("text").maskable.ids
        if name is None:
            raise TypeError(
                "the text tokens carry no ids: put them in Embedded.extras['ids'] in the tower's embed(), or "
                "name the forward argument that holds the token ids [B, L] in HookSpec.text.maskable.ids, "
                "e.g. Maskable(ids='input_ids', never=(pad_id, ...)) (objectives that read token_ids "
                "need one)"
            )
        arguments = self.plan.bind(*step.inputs)
        if name not in arguments:
            raise ValueError(f"HookSpec.text.maskable.ids: the forward call has no argument {name!r}")
        return check_ids(arguments[name], embedded.maskable, f"the forward argument {name!r}")

    def word_embedding(self) -> Tensor:
        """The model's input-embedding matrix ``[V, C]`` itself (``ModalitySpec.word_embedding``,
        else the text embed module when it is an ``nn.Embedding``)."""
        text = self.plan.part("text")
        if text.word_embedding is not None:
            return plan_tensor(self.model, text.word_embedding, "HookSpec.text.word_embedding")
        module = resolve_module(self.model, text.embed, "HookSpec.text.embed")
        if not isinstance(module, nn.Embedding):
            raise TypeError(
                f"HookSpec.text.embed {text.embed!r} is a {type(module).__name__}, not an nn.Embedding, so "
                "it holds no input-embedding matrix to tie to; point HookSpec.text.embed at the "
                "word-embedding table (e.g. 'bert.embeddings.word_embeddings') or set "
                "ModalitySpec(word_embedding=...)"
            )
        return module.weight

    def encoded_with_grad(self, step: Step, modality: str) -> Encoded:
        """The main branch's scoring features of ``modality`` *with* their autograd graph."""
        if step.encoded(modality) is None:
            raise ValueError(
                f"the model declares no {modality} scoring features (HookSpec.{modality}.tokens)"
            )
        tap = self.plan.part(modality).tokens
        steps = projection_steps(tap.project) if tap is not None else ()
        if any((found := registered_step(s)) is not None and not found.differentiable for s in steps):
            raise ValueError(
                f"HookSpec.{modality}.tokens is a dense scoring tap ({tap.project!r}), computed without "  # type: ignore[union-attr]
                "gradient, and an objective asked for the encoder's features with their gradient (Mask "
                "Grounding, cross-modal alignment on encoder features): keep the plain tap for such "
                "objectives, or use the tower adapter's dense= (scorers only)"
            )
        encoded = self._encoded(modality, step.embedded(modality), step.record, grad=True)  # type: ignore[arg-type]
        assert encoded is not None
        return encoded

    def fused(self, step: Step) -> Fused:
        """The ``HookSpec.fused`` features ``[B, N, D]`` of the main branch's one forward."""
        tap = self.spec.fused
        if tap is None:
            raise TypeError(
                "HookSpec.fused is not set: declare a Tap on the decoder's fused features, e.g. "
                "HookSpec(fused=Tap('decoder.fuse', layout='bchw')); with towers, define "
                "forward_with_fused(image, text) -> (logits, fused) on the decoder (see docs/objectives.md)"
            )
        raw = self._tap(tap, None, step.record, "HookSpec.fused")
        if isinstance(raw, Fused):
            return raw
        if not isinstance(raw, Tensor) or raw.dim() != (4 if tap.layout == "bchw" else 3):
            found = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
            raise ValueError(
                f"HookSpec.fused (layout {tap.layout!r}) gives {found}; check its module, select and layout"
            )
        return Fused(tokens=to_bnc(raw, tap.layout), grid=layout_grid(raw, tap.layout, None, square=True))


def maskable_from_rule(rule: Maskable, arguments: dict[str, Any], tokens: Tensor, where: str) -> Tensor:
    """``[B, N]`` bool from a ``Maskable`` rule and the forward's bound ``arguments``."""
    maskable = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def argument(name: str) -> Tensor:
        if name not in arguments:
            raise ValueError(f"{where}: the forward call has no argument {name!r} (got {sorted(arguments)})")
        return torch.as_tensor(arguments[name], device=tokens.device)

    if rule.ids is not None:
        ids = argument(rule.ids)
        for special in rule.never:
            maskable = maskable & (ids != special)
    if rule.attention_mask is not None:
        maskable = maskable & argument(rule.attention_mask).bool()
    if rule.fn is not None:
        maskable = maskable & rule.fn(arguments).to(device=tokens.device, dtype=torch.bool)
    if maskable.shape != tokens.shape[:2]:
        raise ValueError(
            f"{where} gives shape {tuple(maskable.shape)}; the embedded tokens are {tuple(tokens.shape[:2])}"
        )
    return maskable


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"

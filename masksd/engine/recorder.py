"""``Recorder``: masksd's forward hooks on the model, registered once, and the record of each run.

The hooks are registered at wrap time and dispatch to the ``Run`` in progress (in the style of
torchdistill's ``ForwardHookManager``: a recorder apart from the orchestrator, ``Runner``).
Outside a run they return at once, so inference is the bare model bit for bit. A ``Run`` is the
record of one forward of the model: what it is asked to do (replace some embedded tokens, stop
early, record the main branch) and what its hooks captured (tap values, call counts, the main
branch's embedding and reuse outputs).

* Main branch (``Run.record``): the model runs unchanged; the hooks keep every output of the
  embedding and ``reuse`` modules and every tap value.
* Branch: a modality in ``Run.replace`` gets its embedding output replaced (masked positions by a
  mask token, or all tokens); the modules named in ``Run.replays`` are skipped, their ``forward``
  replaced by a ``Replay`` of their main-branch outputs for the duration of the run.
* Probe (``Run.probe``): the embedding outputs become leaves that require grad.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from masksd.engine.plan import Plan, TapKey
from masksd.engine.rng import RngTape
from masksd.layouts import from_bnc, replace_in_layout
from masksd.torch_compat import is_compiling
from masksd.towers import Embedded

__all__ = ["Recorder", "Replacement", "Run", "StopForward", "flatten_tensors"]

_CHECKPOINT_FILE = os.sep + os.path.join("torch", "utils", "checkpoint.py")  # torch.utils.checkpoint's source


class StopForward(BaseException):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside a tap hook to end a features-only run early (a BaseException, so that a
    model's own ``except Exception`` cannot swallow it)."""


@dataclass
class Replacement:
    """How a branch replaces one modality's embedded tokens: the ``masked [B, N]`` positions by
    ``token [C]`` (None: nothing replaced), or every token by ``tokens [B, N, C]``."""

    masked: Tensor | None = None
    token: Tensor | None = None
    tokens: Tensor | None = None


@dataclass
class Run:
    """The record of one forward of the model (see the module docstring).

    Attributes:
        label: how the report names it (``"main"``, ``"masked image"``, ``"probe"``, ...).
        record: the main branch: keep embedding / reuse outputs, watch them for in-place changes.
        probe: the fusion probe: embedding outputs become leaves that require grad.
        replace: modality -> how its embedding output is replaced.
        replays: paths of the modules skipped (served from ``main``'s outputs).
        main: the main branch's run, whose outputs a branch replays and masks.
        tape: dropout replay (``DistillConfig(dropout="replay")``), else None.
        stop: tap sites and how many values each must capture before the run ends early.
    """

    label: str
    record: bool = False
    probe: bool = False
    replace: dict[str, Replacement] = field(default_factory=dict)
    replays: tuple[str, ...] = ()
    main: Run | None = None
    tape: RngTape | None = None
    stop: dict[TapKey, int] | None = None
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    values: dict[TapKey, list[Any]] = field(default_factory=dict)
    embed_outputs: dict[str, list[Any]] = field(default_factory=dict)
    reuse_outputs: dict[str, list[Any]] = field(default_factory=dict)
    embedded: dict[str, Any] = field(default_factory=dict)
    watch: list[tuple[str, Tensor, int]] = field(default_factory=list)

    def outputs(self, path: str) -> list[Any]:
        """What module ``path`` returned in this (main) run: an embedding's or a reuse module's."""
        found = self.embed_outputs.get(path)
        return found if found is not None else self.reuse_outputs.get(path, [])


def flatten_tensors(value: Any) -> list[Tensor]:
    """All tensors inside tuples, lists, dicts (incl. HF ``ModelOutput``) and dataclasses."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in flatten_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in flatten_tensors(getattr(value, f.name))]
    return []


def captured(value: Any) -> Any:
    """What a hook keeps of a module's input or output: ``value`` itself, except under
    ``torch.compile``, where a tensor (or each tensor of a plain tuple / list) is copied.

    Why: a kept tensor leaves the compiled region as an extra output. When it is a view (CRIS's
    projector returns ``out.transpose(0, 1)``) and the model also returns its ``.detach()``,
    AOTAutograd rebuilds one output from the other with the wrong view and fails ("incorrect out
    shape after application of ViewMeta sequence", torch 2.14). A copy is not an alias, and a later
    in-place op of the model cannot change it, which eager mode refuses by checking version
    counters; under compile those counters move without an in-place op of the model (the CRIS-style
    model's ``layer1`` output), so masksd checks nothing there and keeps copies. The cost: one
    buffer per kept tensor, under compile only.
    """
    if not is_compiling():
        return value
    if isinstance(value, Tensor):
        return value.clone()
    if type(value) in (tuple, list):
        return type(value)(v.clone() if isinstance(v, Tensor) else v for v in value)
    return value


def refuse_checkpointed_embedding(modality: str, embed: str) -> None:
    """Raise when a branch replaces tokens inside ``torch.utils.checkpoint`` (a frame of that file
    is on the stack): backward recomputes the region with masksd's hooks inert, so the recomputed
    tokens would not be replaced: torch fails with "A different number of tensors was saved", or,
    where the counts happen to match, the gradients are silently the unmasked branch's."""
    if is_compiling():
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            raise ValueError(
                f"HookSpec.{modality}.embed {embed!r} runs inside a torch.utils.checkpoint region: backward "
                "recomputes it without masksd's token replacement, so the masked branch's gradients would be "
                "wrong. Checkpoint only what runs after the embedding (the blocks or layers, as Swin, BERT "
                "and timm do), or hook an embedding module that runs outside the checkpointed function"
            )
        frame = frame.f_back


class Replay:
    """Stands in for a skipped module's ``forward``: returns its main-branch outputs in order."""

    def __init__(self, path: str) -> None:
        self.path, self.outputs, self.calls = path, [], 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls >= len(self.outputs):
            raise RuntimeError(
                f"reuse module {self.path!r} ran {self.calls + 1} times in a masked branch but "
                f"{len(self.outputs)} times in the main branch; remove it from reuse"
            )
        self.calls += 1
        return self.outputs[self.calls - 1]


def rng_point(path: str, call: int) -> str:
    """The name of the generator state after call ``call`` (0-based) of module ``path``."""
    return f"after {path} #{call}"


@torch.compiler.disable
def _install(
    modules: list[tuple[str, nn.Module]], main: Run, replays: dict[str, Replay]
) -> list[tuple[nn.Module, Any]]:
    """Replace each module's ``forward`` by a ``Replay`` of ``main``'s outputs; returns what
    ``_restore`` puts back. Run eagerly: under ``torch.compile`` of the wrapper, dynamo defers the
    ``setattr`` but not a traced ``del module.forward``, which then finds nothing. One ``Replay``
    per module, refilled at every step: compiled code guards on the object behind
    ``module.forward``, and a new one at every step would recompile it."""
    saved = []
    for path, module in modules:
        saved.append((module, module.__dict__.get("forward")))
        replay = replays.setdefault(path, Replay(path))
        replay.outputs, replay.calls = main.outputs(path), 0
        module.forward = replay  # type: ignore[method-assign]
    return saved


@torch.compiler.disable
def _restore(saved: list[tuple[nn.Module, Any]]) -> None:
    for module, forward in saved:
        replay = module.__dict__.pop("forward", None)
        if isinstance(replay, Replay):
            replay.outputs = []  # the main branch's outputs are not kept by the stand-in
        if forward is not None:
            module.forward = forward  # type: ignore[method-assign]


@torch.compiler.disable
def swap_module(parent: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``parent.<name>`` (eagerly, as ``_install``); returns the old one."""
    old = parent._modules[name]
    parent._modules[name] = module
    assert old is not None
    return old


class Recorder:
    """The engine's hooks on ``plan.model`` (see the module docstring).

    Attributes:
        run: the run in progress, or None (the hooks return at once).
        call_log / replay_log / tap_log: ``(run label, name) -> count`` of real module calls,
            replayed calls and captured tap values; they count only while ``logging`` is set
            (``wrapper.check()``): counters that grew at every step would make torch.compile guard
            on their values and recompile.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.run: Run | None = None
        self.logging = False
        self.call_log: Counter[tuple[str, str]] = Counter()
        self.replay_log: Counter[tuple[str, str]] = Counter()
        self.tap_log: Counter[tuple[str, str]] = Counter()
        self._replays: dict[str, Replay] = {}
        self._reuse_paths = set(plan.reuse_paths())
        self._handles: list[Any] = []
        for m in plan.modalities:
            path, module = plan.embeds[m]
            self._handles.append(module.register_forward_hook(partial(self._on_embed, m)))
            for reuse_path, reused in plan.reuse[m]:
                self._handles.append(reused.register_forward_hook(partial(self._on_reuse, reuse_path)))
        for key, module in plan.taps.items():
            if key[1] == "input":
                self._handles.append(module.register_forward_pre_hook(partial(self._on_tap_input, key)))
            else:
                self._handles.append(module.register_forward_hook(partial(self._on_tap_output, key)))

    def remove(self) -> None:
        """Remove every hook masksd registered on the model (the wrapper no longer trains it)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forward(self, run: Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call the model once under ``run``; its replays are installed for the call only."""
        run.values = {key: [] for key in self.plan.taps}
        modules = [(path, module) for path, module in self._modules().items() if path in run.replays]
        saved = _install(modules, run.main, self._replays) if modules and run.main is not None else []
        self.run = run
        try:
            return self.plan.model(*args, **kwargs)
        finally:
            self.run = None
            _restore(saved)

    def _modules(self) -> dict[str, nn.Module]:
        """The modules a run may skip: every embedding and ``reuse`` module, by path."""
        found = {}
        for m in self.plan.modalities:
            found.update([self.plan.embeds[m], *self.plan.reuse[m]])
        return found

    @contextmanager
    def logged(self) -> Iterator[None]:
        """Count module calls, replays and tap values while the block runs (``check()``)."""
        self.call_log.clear()
        self.replay_log.clear()
        self.tap_log.clear()
        self.logging = True
        try:
            yield
        finally:
            self.logging = False

    def _log(self, counter: Counter[tuple[str, str]], run: Run, name: str) -> None:
        if self.logging:
            counter[(run.label, name)] += 1

    # ------------------------------------------------------------------------------- hooks
    def _on_embed(self, modality: str, module: nn.Module, args: Any, output: Any) -> Any:
        run = self.run
        if run is None:
            return None
        part = self.plan.part(modality)
        index = run.calls[("embed", part.embed)]
        run.calls[("embed", part.embed)] += 1
        replayed = isinstance(module.__dict__.get("forward"), Replay)
        if part.embed not in self._reuse_paths:  # a reuse module's own hook counts its calls
            self._log(self.replay_log if replayed else self.call_log, run, part.embed)
        if run.record:  # every output: a branch replays them instead of embedding again
            outputs = run.embed_outputs.setdefault(part.embed, [])
            outputs.append(captured(output))
            _record_rng(run, part.embed, len(outputs) - 1)
        elif replayed:
            _restore_rng(run, module)
        if index != (part.call or 0):
            return None
        tokens = output.tokens if isinstance(output, Embedded) else output
        if not isinstance(tokens, Tensor) or not tokens.is_floating_point():
            raise TypeError(
                f"HookSpec.{modality}.embed {part.embed!r} must output a floating tensor (or a "
                f"masksd.Embedded), got {type(output).__name__}; choose the module whose output is the "
                "embedded tokens"
            )
        if run.probe:
            leaf = run.embedded[modality] = tokens.detach().requires_grad_(True)
            return with_tokens(output, leaf.clone())  # not a leaf: later in-place ops stay legal
        if run.record:
            run.embedded[modality] = kept = run.embed_outputs[part.embed][index]
            self._watch(run, f"HookSpec.{modality}.embed {part.embed!r}", kept)
            return None
        replacement = run.replace.get(modality)
        if replacement is None or run.main is None:
            return None
        refuse_checkpointed_embedding(modality, part.embed)
        main = run.main.embedded[modality]
        raw = main.tokens if isinstance(main, Embedded) else main
        if replacement.tokens is not None:
            return with_tokens(main, from_bnc(replacement.tokens, part.layout, raw).to(raw.dtype))
        if replacement.token is None or replacement.masked is None:
            return main
        return with_tokens(main, replace_in_layout(raw, replacement.masked, replacement.token, part.layout))

    def _on_reuse(self, path: str, module: nn.Module, args: Any, output: Any) -> None:
        run = self.run
        if run is None:
            return
        replayed = isinstance(module.__dict__.get("forward"), Replay)
        self._log(self.replay_log if replayed else self.call_log, run, path)
        if run.record or run.probe:
            kept = captured(output)
            outputs = run.reuse_outputs.setdefault(path, [])
            outputs.append(kept)
            if run.record:
                self._watch(run, f"reuse module {path!r}", kept)
                _record_rng(run, path, len(outputs) - 1)
        elif replayed:
            _restore_rng(run, module)

    def _on_tap_input(self, key: TapKey, module: nn.Module, args: Any) -> None:
        run = self.run
        if run is not None:
            run.values[key].append(captured(args))
            self._log(self.tap_log, run, self.plan.tap_labels[key])
            self._check_stop(run)

    def _on_tap_output(self, key: TapKey, module: nn.Module, args: Any, output: Any) -> None:
        run = self.run
        if run is None:
            return
        kept = captured(output)
        run.values[key].append(kept)
        self._log(self.tap_log, run, self.plan.tap_labels[key])
        if run.record:
            self._watch(run, f"tapped module {key[0]!r}", kept)
        self._check_stop(run)

    @staticmethod
    def _check_stop(run: Run) -> None:
        """End a features-only run once every awaited tap has fired enough."""
        if run.stop and all(len(run.values[key]) >= count for key, count in run.stop.items()):
            raise StopForward

    @staticmethod
    def _watch(run: Run, name: str, kept: Any) -> None:
        """Remember the versions of a kept value's tensors, to refuse later in-place changes
        (eager only: under torch.compile the kept values are copies, ``captured``)."""
        if not is_compiling():
            run.watch += [(name, t, t._version) for t in flatten_tensors(kept)]


def _record_rng(run: Run, path: str, call: int) -> None:
    """Dropout replay: the generator state after call ``call`` of module ``path`` (main branch)."""
    if run.tape is not None:
        run.tape.record(rng_point(path, call))


def _restore_rng(run: Run, module: nn.Module) -> None:
    """Dropout replay: a branch that skipped ``module`` jumps to the state its main call left."""
    replay = module.__dict__["forward"]
    if run.tape is not None:
        run.tape.restore(rng_point(replay.path, replay.calls - 1))


def with_tokens(embedded: Any, tokens: Tensor) -> Any:
    """An embed module's output with its tokens replaced: ``tokens`` itself, or for a
    ``masksd.Embedded`` (the tower entry's sites) a copy carrying ``tokens``."""
    return embedded.with_tokens(tokens) if isinstance(embedded, Embedded) else tokens

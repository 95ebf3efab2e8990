"""``wrapper.check(batch)``: one instrumented training step that says how masksd runs a model.

It reports the backend, the fusion type (probed or declared), what each masked branch runs,
how often every hooked module ran per branch, how often each tap (logits, scoring features,
fused features) captured a value per branch, and the trainable parameters that got no
gradient (if any, ``DistributedDataParallel`` needs ``find_unused_parameters=True`` — or freeze
them). Parameters, gradients, buffers (BatchNorm statistics) and the RNG state are restored.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from masksd.engine.plan import Plan
from masksd.engine.recorder import Recorder
from masksd.engine.rng import rng_devices

__all__ = ["WrapReport", "run_check"]


@dataclass
class WrapReport:
    """What ``MaskedSelfDistill.check`` found (``str(report)`` prints it).

    Attributes:
        backend: ``"hooks"`` (one engine runs both entries).
        fusion: ``"late"``, ``"text->image"``, ``"image->text"``, ``"bidirectional"`` (or why
            it is unknown).
        passes: per branch, what it re-runs (``"full forward"``, or which modules it skips).
        calls: per run (``"main"``, ``"masked image"``, ``"masked text"``), how often each
            hooked module really ran; ``replayed``: how often a skipped module was served from
            the main branch instead.
        taps: per run, how often each tap site captured a value, labelled
            ``"<module> [roles]"`` (``"neck (input) [image.tokens, text.global_]"`` for an input
            tap); a tap the spec reads once (``call=None``) must fire once in the main branch.
        losses: the step's unweighted loss terms.
        no_grad: trainable parameters that received no gradient in the step.
        warnings: problems found in the step that do not stop training, e.g. a degenerate
            scorer (``masksd.scorer_health``), each with its fix.
    """

    backend: str
    fusion: str
    passes: dict[str, str]
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    replayed: dict[str, dict[str, int]] = field(default_factory=dict)
    taps: dict[str, dict[str, int]] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    no_grad: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """Whether DDP needs ``find_unused_parameters=True`` for this model (some parameter
        got no gradient)."""
        return bool(self.no_grad)

    def __str__(self) -> str:
        lines = [f"masksd wrap check: backend {self.backend}, fusion {self.fusion}"]
        lines += [f"  {name}: {what}" for name, what in self.passes.items()]
        order = {"probe": 0, "main": 1}
        for run in sorted({*self.calls, *self.replayed, *self.taps}, key=lambda r: (order.get(r, 2), r)):
            lines.append(f"  {run} run:")
            for what, counts in (("modules ran", self.calls), ("reused from the main branch", self.replayed),
                                 ("taps fired", self.taps)):
                if counts.get(run):
                    lines.append(f"    {what}: " + ", ".join(f"{m} ×{n}" for m, n in counts[run].items()))
        lines.append("  losses: " + ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items()))
        if self.no_grad:
            shown = ", ".join(self.no_grad[:12]) + (" ..." if len(self.no_grad) > 12 else "")
            lines.append(
                f"  {len(self.no_grad)} trainable parameter(s) got no gradient: {shown}; DDP needs "
                "find_unused_parameters=True unless you freeze them (requires_grad_(False))"
            )
        else:
            lines.append(
                "  every trainable parameter got a gradient: DDP works with find_unused_parameters=False"
            )
        lines += [f"  warning: {text}" for text in self.warnings]
        return "\n".join(lines)


def _nested(counter: Any) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for (run, path), count in sorted(counter.items()):
        out[run][path] = count
    return dict(out)


def run_check(wrapper: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> WrapReport:
    """One instrumented training step of ``wrapper`` (a ``MaskedSelfDistill``; see the module
    docstring)."""
    runner = wrapper.runner
    recorder: Recorder = runner.recorder
    objectives = list(wrapper.objectives.values())  # type: ignore[union-attr]
    for objective in objectives:
        if callable(getattr(objective, "recheck_scores", None)):
            objective.recheck_scores()
    was_training = wrapper.training
    grads = {name: p.grad for name, p in wrapper.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in wrapper.named_buffers()}
    try:
        for p in wrapper.parameters():
            p.grad = None
        with torch.random.fork_rng(devices=rng_devices(wrapper)), recorder.logged():
            wrapper.train()
            out = wrapper(*args, **kwargs)
            out.loss.backward()
        no_grad = [n for n, p in wrapper.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        for name, p in wrapper.named_parameters():
            p.grad = grads[name]
        with torch.no_grad():
            for name, b in wrapper.named_buffers():
                if not torch.equal(b, buffers[name]):  # untouched buffers keep their version
                    b.copy_(buffers[name])
        wrapper.train(was_training)
    facts = runner.describe()
    warnings = [f"{o.name}: {o.score_warning}" for o in objectives if getattr(o, "score_warning", None)]
    warnings += _never_called(runner.plan, recorder)
    return WrapReport(
        backend="hooks",
        fusion=str(facts.get("fusion", "")),
        passes=dict(facts.get("passes", {})),
        calls=_nested(recorder.call_log),
        replayed=_nested(recorder.replay_log),
        taps=_nested(recorder.tap_log),
        losses={k: float(v) for k, v in out.losses.items()},
        no_grad=no_grad,
        warnings=warnings,
    )


def _never_called(plan: Plan, recorder: Recorder) -> list[str]:
    """A ``reuse`` module the main branch never called as a module: nothing can be reused."""
    return [
        f"reuse module {path!r} never ran as a module in the main branch (the model uses it another "
        "way, e.g. its weights directly, or not at all), so the masked branches cannot reuse its output "
        "and compute whatever the model does with it again: correct, but it costs that computation; "
        "list in `reuse` the modules the model calls (see the calls above), or drop this one"
        for path in plan.reuse_paths()
        if not recorder.call_log.get(("main", path)) and not recorder.replay_log.get(("main", path))
    ]

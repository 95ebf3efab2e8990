"""``Plan``: a ``HookSpec`` compiled once against the model, at wrap time.

Everything the engine looks up by name is resolved here, once: the embedding modules, the
``reuse`` patterns expanded to modules, the tap sites and how the report labels them, the
forward's signature, the declared fusion. Spec mistakes end here, in an error naming the spec
field, before the model runs. ``Tap.project`` steps are module or parameter paths, or registered
projection steps (``register_projection``: the CLIP dense-alignment step of
``masksd.adapters.clip_dense`` is one), so the engine imports no adapter.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from masksd.spec import HookSpec, ModalitySpec, Tap
from masksd.step import MODALITIES, Modality

__all__ = ["DEPENDS", "Plan", "ProjectionStep", "project", "register_projection", "resolve_module"]

DEPENDS = {  # declared fusion -> (image depends on text, text depends on image)
    "late": (False, False),
    "text->image": (True, False),
    "image->text": (False, True),
    "bidirectional": (True, True),
}

TapKey = tuple[str, str]  # (module path, "input" | "output")


def resolve_module(model: nn.Module, path: str, argument: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the spec field and close names."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
        hint = f"; modules with a similar name: {close}" if close else ""
        raise ValueError(
            f"{argument}: the model ({type(model).__name__}) has no module {path!r}{hint}. Paths are "
            "relative to the bare model, as in model.named_modules()"
        ) from None


def resolve_tensor(model: nn.Module, path: str, argument: str) -> Tensor:
    """The ``[V, C]`` matrix at ``path``: an ``nn.Embedding``'s weight or a parameter/tensor attribute."""
    try:
        value: Any = model.get_submodule(path)
    except AttributeError:
        owner, _, name = path.rpartition(".")
        value = getattr(resolve_module(model, owner, argument) if owner else model, name, None)
    value = value.weight if isinstance(value, nn.Embedding) else value
    if not isinstance(value, Tensor) or value.dim() != 2:
        raise ValueError(
            f"{argument} {path!r} is neither an nn.Embedding nor a [V, C] parameter of the model"
        )
    return value


def expand_patterns(
    model: nn.Module, patterns: tuple[str, ...], argument: str
) -> list[tuple[str, nn.Module]]:
    """Module paths (``fnmatch`` patterns allowed), outermost matches only, in model order."""
    named = dict(model.named_modules())
    chosen: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            hits = [name for name in named if name and fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise ValueError(f"{argument}: pattern {pattern!r} matches no module of the model")
            chosen.extend(hits)
        else:
            resolve_module(model, pattern, argument)
            chosen.append(pattern)
    outer = [p for p in chosen if not any(p != q and p.startswith(q + ".") for q in chosen)]
    order = {name: i for i, name in enumerate(named)}
    return [(p, named[p]) for p in sorted(set(outer), key=order.__getitem__)]


def infer_width(module: nn.Module) -> int | None:
    """Channel width of a module's output read off its type, or None when it cannot be told."""
    width = getattr(module, "embed_dim", None)
    if isinstance(width, int) and not isinstance(width, bool):
        return width
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Embedding):
        return int(module.embedding_dim)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return int(module.num_features)
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    for child in reversed(list(module.children())):
        width = infer_width(child)
        if width is not None:
            return width
    return None


def refuse_wrapped(model: Any) -> None:
    """Refuse DDP / DataParallel / torch.compile wrappers: hooks belong on the bare model."""
    wrapped = (isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
               or hasattr(model, "_orig_mod"))
    if wrapped:
        raise TypeError(
            f"model is a {type(model).__name__}: wrap the bare model first, then put the wrapper in "
            "DistributedDataParallel (DDP(masksd.wrap(model, spec))); compile submodules, not the "
            "model passed to masksd"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


# ----------------------------------------------------------------------------- projections
@dataclass(frozen=True)
class ProjectionStep:
    """A registered ``Tap.project`` step ``"<prefix>:<arguments>"``.

    Attributes:
        apply: ``apply(model, step, value [B, N, D]) -> [B, N, D']`` (``step`` is the whole string).
        differentiable: False when the step computes without gradient (a scorer-only feature):
            objectives that need the features with their gradient refuse it.
    """

    apply: Callable[[nn.Module, str, Tensor], Tensor]
    differentiable: bool = True


_PROJECTIONS: dict[str, ProjectionStep] = {}


def register_projection(prefix: str, apply: Callable[[nn.Module, str, Tensor], Tensor], *,
                        differentiable: bool = True) -> None:
    """Let ``Tap.project`` steps that start with ``"<prefix>:"`` run ``apply``."""
    _PROJECTIONS[prefix] = ProjectionStep(apply, differentiable)


def projection_steps(paths: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (paths,) if isinstance(paths, str) else tuple(paths or ())


def registered_step(path: str) -> ProjectionStep | None:
    prefix, colon, _ = path.partition(":")
    return _PROJECTIONS.get(prefix) if colon else None


def project(model: nn.Module, paths: str | tuple[str, ...] | None, value: Tensor) -> Tensor:
    """Apply ``Tap.project``: module paths (``module(value)``), parameter paths (``value @ P``) or
    registered steps, in order; None leaves ``value`` as it is."""
    for path in projection_steps(paths):
        step = registered_step(path)
        if step is not None:
            value = step.apply(model, path, value)
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is not None:
            value = module(value)
            continue
        owner, _, name = path.rpartition(".")
        try:
            matrix = getattr(model.get_submodule(owner) if owner else model, name)
        except AttributeError:
            matrix = None
        if not isinstance(matrix, Tensor):
            prefix, colon, _ = path.partition(":")
            hint = (f" nor a registered step ('{prefix}:' is not registered: import the module that "
                    "registers it, e.g. masksd.adapters.clip_dense)") if colon else ""
            raise ValueError(
                f"Tap.project {path!r} is neither a module nor a parameter/tensor of the model{hint}"
            )
        value = value @ matrix.to(value.dtype)
    return value


def init_token(model: nn.Module, init: str, token: Tensor, where: str) -> None:
    """Initialise a mask token in place: ``"learned"`` (keep), ``"zero"``, ``"embedding:<path>:<row>"``."""
    with torch.no_grad():
        if init == "zero":
            token.zero_()
        elif init.startswith("embedding:"):
            _, path, row = init.split(":")
            weight = resolve_module(model, path, where).weight
            if weight.shape[-1] != token.shape[0]:
                raise ValueError(
                    f"{where}: row width {weight.shape[-1]} of {path!r} differs from the embedded width "
                    f"{token.shape[0]}"
                )
            token.copy_(weight[int(row)])


# ------------------------------------------------------------------------------------ plan
def spec_taps(spec: HookSpec, modalities: list[Modality]) -> list[tuple[str, Tap]]:
    """Every ``Tap`` of ``spec`` with its role: ``"logits"``, ``"<modality>.tokens"``,
    ``"<modality>.global_"``, ``"fused"`` (in that order)."""
    taps: list[tuple[str, Tap]] = [("logits", spec.logits)] if isinstance(spec.logits, Tap) else []
    for m in modalities:
        part = spec.modality(m)
        taps += [(f"{m}.{name}", t) for name, t in (("tokens", part.tokens), ("global_", part.global_))
                 if t is not None]
    return taps + ([("fused", spec.fused)] if spec.fused is not None else [])


@dataclass
class Plan:
    """A ``HookSpec`` resolved against ``model`` (see the module docstring).

    Attributes:
        model / spec: what was compiled.
        signature: ``inspect.signature(model.forward)``, to bind a step's arguments by name.
        modalities: the declared modalities, in ``("image", "text")`` order.
        embeds: modality -> ``(path, module)`` of its embedding module.
        reuse: modality -> the ``(path, module)`` its ``reuse`` patterns expand to.
        taps: every tap site ``(module path, kind)`` -> its module.
        tap_labels: how the report names each tap site, e.g. ``"neck (input) [image.tokens]"``.
        declared: the ``depends`` pair of a declared ``HookSpec.fusion``, None for ``"auto"``.
    """

    model: nn.Module
    spec: HookSpec
    signature: inspect.Signature
    modalities: list[Modality]
    embeds: dict[str, tuple[str, nn.Module]]
    reuse: dict[str, list[tuple[str, nn.Module]]]
    taps: dict[TapKey, nn.Module]
    tap_labels: dict[TapKey, str]
    declared: dict[str, bool | None] | None

    @classmethod
    def compile(cls, model: nn.Module, spec: HookSpec) -> Plan:
        """Resolve ``spec`` on ``model``; a ``ValueError``/``TypeError`` names the spec field at fault."""
        refuse_wrapped(model)
        if not isinstance(spec, HookSpec):
            raise TypeError(f"spec must be a masksd.HookSpec, got {type(spec).__name__}")
        modalities = [m for m in MODALITIES if getattr(spec, m) is not None]
        embeds, reuse = {}, {}
        for m in modalities:
            part = spec.modality(m)
            if part.call is not None and part.call < 0:
                raise ValueError(
                    f"HookSpec.{m}.call must be >= 0 (which call of {part.embed!r}), got {part.call}"
                )
            embeds[m] = (part.embed, resolve_module(model, part.embed, f"HookSpec.{m}.embed"))
            reuse[m] = expand_patterns(model, part.reuse, f"HookSpec.{m}.reuse")
        roles: dict[TapKey, list[str]] = {}
        taps: dict[TapKey, nn.Module] = {}
        for role, tap in spec_taps(spec, modalities):
            key = (tap.module, tap.kind)
            roles.setdefault(key, []).append(role)
            if key not in taps:
                taps[key] = resolve_module(model, tap.module, f"Tap({tap.module!r})") if tap.module else model
        labels = {key: f"{key[0] or '<model>'}{' (input)' if key[1] == 'input' else ''} [{', '.join(names)}]"
                  for key, names in roles.items()}
        if spec.decoder is not None:
            resolve_module(model, spec.decoder, "HookSpec.decoder")
        declared = None
        if spec.fusion != "auto":
            image_on_text, text_on_image = DEPENDS[spec.fusion]
            declared = {"image": image_on_text, "text": text_on_image}
        return cls(
            model, spec, inspect.signature(model.forward), modalities, embeds, reuse, taps, labels, declared
        )

    def part(self, modality: str) -> ModalitySpec:
        """The ``ModalitySpec`` of ``modality`` (ValueError when the spec declares none)."""
        return self.spec.modality(modality)

    def width(self, modality: str) -> int:
        """Width C of ``modality``'s embedded tokens (the size of its mask token)."""
        part = self.part(modality)
        if part.width is not None:
            return int(part.width)
        path, module = self.embeds[modality]
        width = infer_width(module)
        if width is None:
            raise ValueError(
                f"cannot tell the output width of HookSpec.{modality}.embed {path!r} "
                f"({type(module).__name__}); set ModalitySpec(width=...) to its channel count"
            )
        return width

    def reuse_paths(self) -> list[str]:
        """The ``reuse`` modules' paths (both modalities), as the spec's patterns expanded."""
        return [path for m in self.modalities for path, _ in self.reuse[m]]

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The step's arguments by the name ``model.forward`` gives them."""
        try:
            return dict(self.signature.bind(*args, **kwargs).arguments)
        except TypeError as error:
            raise TypeError(
                f"the wrapper's arguments do not fit {type(self.model).__name__}.forward{self.signature}: "
                f"{error}"
            ) from None

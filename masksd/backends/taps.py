"""Small helpers of the hook backend: module lookup, value flattening, layouts, widths."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from masksd.adapters.clip_dense import STEP_PREFIX as DENSE_STEP
from masksd.adapters.clip_dense import apply_dense_step
from masksd.spec import HookSpec, Maskable, Tap
from masksd.torch_compat import is_compiling
from masksd.towers import Embedded

__all__ = [
    "Replay",
    "expand_patterns",
    "flatten_tensors",
    "infer_width",
    "init_token",
    "layout_grid",
    "mask_in_layout",
    "maskable_from_rule",
    "project",
    "refuse_checkpointed_embedding",
    "refuse_wrapped",
    "resolve_module",
    "resolve_tensor",
    "spec_taps",
    "tap_label",
    "to_bnc",
    "with_tokens",
]


_CHECKPOINT_FILE = os.sep + os.path.join("torch", "utils", "checkpoint.py")  # torch.utils.checkpoint's source


def resolve_module(model: nn.Module, path: str, argument: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the spec field."""
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
        raise ValueError(f"{argument} {path!r} is neither an nn.Embedding nor a [V, C] parameter of the model")
    return value


def expand_patterns(model: nn.Module, patterns: tuple[str, ...], argument: str) -> list[tuple[str, nn.Module]]:
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
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        shape = getattr(module, "normalized_shape", None)
        return int(shape[-1]) if shape else int(module.num_channels)  # type: ignore[union-attr]
    for child in reversed(list(module.children())):
        width = infer_width(child)
        if width is not None:
            return width
    return None


def to_bnc(value: Tensor, layout: str) -> Tensor:
    """A ``[B, N, C]`` view of a tensor in ``layout`` (``bnc``, ``bchw`` or ``nbc``)."""
    if layout == "bchw":
        return rearrange(value, "b c h w -> b (h w) c")
    if layout == "nbc":
        return rearrange(value, "n b c -> b n c")
    if layout == "bcn":
        return rearrange(value, "b c n -> b n c")
    return value


def layout_grid(value: Tensor, layout: str, declared: tuple[int, int] | None, *, square: bool) -> tuple[int, int] | None:
    """The 2-D grid of a token tensor: from a ``bchw`` shape, the declared grid, or a square count."""
    if layout == "bchw":
        return (int(value.shape[-2]), int(value.shape[-1]))
    if declared is not None:
        return declared
    count = int(value.shape[{"nbc": 0, "bcn": 2}.get(layout, 1)])
    side = math.isqrt(count)
    return (side, side) if square and side * side == count else None


def mask_in_layout(masked: Tensor, layout: str, grid: tuple[int, int] | None) -> Tensor:
    """``masked [B, N]`` reshaped to broadcast against a tensor in ``layout``."""
    if layout == "bchw":
        assert grid is not None
        return rearrange(masked, "b (h w) -> b 1 h w", h=grid[0], w=grid[1])
    if layout == "nbc":
        return rearrange(masked, "b n -> n b 1")
    if layout == "bcn":
        return masked[:, None, :]
    return masked[..., None]


def replace_in_layout(
    embedded: Tensor, masked: Tensor, token: Tensor, layout: str, grid: tuple[int, int] | None
) -> Tensor:
    """``embedded`` with ``masked`` positions replaced by ``token [C]`` (kept in the graph)."""
    where = mask_in_layout(masked, layout, grid)
    shape = {"bchw": (1, -1, 1, 1), "bcn": (1, -1, 1)}.get(layout, (1, 1, -1))
    return torch.where(where, token.to(embedded.dtype).view(shape), embedded)


def with_tokens(embedded: Any, tokens: Tensor) -> Any:
    """An embed module's output with its tokens replaced: ``tokens`` itself, or for a
    ``masksd.Embedded`` (the tower entry's sites) a copy carrying ``tokens``."""
    return embedded.with_tokens(tokens) if isinstance(embedded, Embedded) else tokens


def inside_activation_checkpoint() -> bool:
    """Whether the caller runs inside ``torch.utils.checkpoint`` (a frame of that file is on the
    Python stack: the function a checkpoint runs is called from it, in both the non-reentrant and
    the reentrant implementation, and in every torch release masksd supports)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back
    return False


def refuse_checkpointed_embedding(modality: str, embed: str) -> None:
    """Raise when a masked branch replaces tokens inside an activation checkpoint.

    Backward recomputes a ``torch.utils.checkpoint`` region with masksd's hooks inert, so the
    recomputation would not replace the tokens: torch fails with "A different number of tensors
    was saved" (non-reentrant) or, where the counts happen to match and with the reentrant
    implementation, the gradients would silently be the unmasked branch's. Not under compile.
    """
    if is_compiling() or not inside_activation_checkpoint():
        return
    raise ValueError(
        f"HookSpec.{modality}.embed {embed!r} runs inside a torch.utils.checkpoint region: backward "
        "recomputes it without masksd's token replacement, so the masked branch's gradients would be "
        "wrong. Checkpoint only what runs after the embedding (the blocks or layers, as Swin, BERT "
        "and timm do), or hook an embedding module that runs outside the checkpointed function"
    )


def refuse_wrapped(model: Any) -> None:
    """Refuse DDP / DataParallel / torch.compile wrappers: hooks belong on the bare model."""
    wrapped = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(
        model, "_orig_mod"
    )
    if wrapped:
        raise TypeError(
            f"model is a {type(model).__name__}: wrap the bare model first, then put the wrapper in "
            "DistributedDataParallel (DDP(masksd.wrap(model, spec))); compile submodules, not the "
            "model passed to masksd"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


class Replay:
    """Stands in for a skipped module's ``forward``: returns its main-branch outputs in order."""

    def __init__(self, path: str, outputs: list[Any]) -> None:
        self.path, self.outputs, self.calls = path, outputs, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls >= len(self.outputs):
            raise RuntimeError(
                f"reuse module {self.path!r} ran {self.calls + 1} times in a masked branch but "
                f"{len(self.outputs)} times in the main branch; remove it from reuse"
            )
        self.calls += 1
        return self.outputs[self.calls - 1]


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
        raise ValueError(f"{where} gives shape {tuple(maskable.shape)}; the embedded tokens are {tuple(tokens.shape[:2])}")
    return maskable


def init_token(model: nn.Module, init: str, token: Tensor, where: str) -> None:
    """Initialise a mask token in place: ``"learned"`` (keep), ``"zero"``, ``"embedding:<path>:<row>"``."""
    with torch.no_grad():
        if init == "zero":
            token.zero_()
        elif init.startswith("embedding:"):
            _, path, row = init.split(":")
            weight = resolve_module(model, path, where).weight
            if weight.shape[-1] != token.shape[0]:
                raise ValueError(f"{where}: row width {weight.shape[-1]} of {path!r} differs from the embedded width {token.shape[0]}")
            token.copy_(weight[int(row)])


def project(model: nn.Module, paths: str | tuple[str, ...] | None, value: Tensor) -> Tensor:
    """Apply ``Tap.project``: module paths (``module(value)``), parameter paths (``value @ P``) or
    ``"clip_dense:<mode>:<P>:<block path>"`` steps (``masksd.adapters.clip_dense``), in order; None
    leaves ``value`` as it is."""
    for path in (paths,) if isinstance(paths, str) else tuple(paths or ()):
        if path.startswith(DENSE_STEP):
            value = apply_dense_step(model, path, value)
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
            raise ValueError(f"Tap.project {path!r} is neither a module nor a parameter/tensor of the model")
        value = value @ matrix.to(value.dtype)
    return value


def spec_taps(spec: HookSpec, modalities: list[str]) -> list[tuple[str, Tap]]:
    """Every ``Tap`` of ``spec`` with its role: ``"logits"``, ``"<modality>.tokens"``,
    ``"<modality>.global_"``, ``"fused"`` (in that order; ``modalities`` are the declared ones)."""
    taps: list[tuple[str, Tap]] = [("logits", spec.logits)] if isinstance(spec.logits, Tap) else []
    for m in modalities:
        part = spec.modality(m)
        taps += [(f"{m}.{name}", t) for name, t in (("tokens", part.tokens), ("global_", part.global_)) if t is not None]
    return taps + ([("fused", spec.fused)] if spec.fused is not None else [])


def tap_label(key: tuple[str, str], roles: list[str]) -> str:
    """How the wrap-time report names one hooked tap site, e.g. ``"neck (input) [image.tokens, text.global_]"``."""
    module, kind = key
    return f"{module or '<model>'}{' (input)' if kind == 'input' else ''} [{', '.join(roles)}]"

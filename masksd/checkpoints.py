"""Convert a training checkpoint (the wrapper's ``state_dict()``) for the places it must load into.

A ``MaskedSelfDistill`` state dict holds the bare model under ``model.`` and the training-only
state (mask tokens, objective heads, private decoders) under ``objectives.``. Loading it into the
bare model with ``strict=False`` silently loads *nothing* (every key is "unexpected"), so use one
of these, strict by default:

* ``bare_state_dict(training)``: the bare model's state dict (``model.`` stripped,
  ``objectives.*`` dropped); ``load_bare_state_dict(bare_model, training)`` loads it.
* ``added_state_dict(training)``: the ``objectives.*`` entries alone;
  ``split_training_state_dict(training)`` gives both parts.
* ``open_clip_state_dict(training, model, clip)``: the state dict of the open_clip ``CLIP`` the
  model's towers were built from (``towers_from_open_clip(clip)``, or any model holding ``clip``'s
  modules), so that a fresh ``CLIP`` loads it with ``strict=True``. The key mapping is derived from
  which tensors the model and ``clip`` share, not from a hand-written list.

Every function takes the state dict itself (``checkpoint["model"]`` in the reference example's
files), never a path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = [
    "MODEL_PREFIX",
    "ADDED_PREFIX",
    "split_training_state_dict",
    "bare_state_dict",
    "added_state_dict",
    "load_bare_state_dict",
    "open_clip_state_dict",
]

MODEL_PREFIX = "model."
ADDED_PREFIX = "objectives."
_SHOWN = 8


def _listing(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _check_mapping(state: Any, argument: str) -> Mapping[str, Any]:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{argument} must be a state dict (a mapping of names to tensors), got {type(state).__name__}; "
            "load the file first, e.g. torch.load(path, map_location='cpu', weights_only=True)"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        hint = ""
        if "model" in state and isinstance(state["model"], Mapping):
            hint = f"; this looks like a whole checkpoint file: pass {argument}['model']"
        raise TypeError(
            f"{argument} must map names to tensors, but {_listing(not_tensors)} "
            f"{'is' if len(not_tensors) == 1 else 'are'} not tensors{hint}"
        )
    return state


def _outer_prefix(state: Mapping[str, Tensor]) -> str | None:
    """``"wrapper."`` when every key reads ``wrapper.model.*`` or ``wrapper.objectives.*`` with one
    common prefix and at least one ``objectives.`` key (a bare model's own ``model`` submodule
    alone does not count); else None."""
    prefixes, training_only = set(), False
    for key in state:
        cut = min((i for marker in ("." + MODEL_PREFIX, "." + ADDED_PREFIX) if (i := key.find(marker)) >= 0),
                  default=-1)
        if cut < 0:
            return None
        prefixes.add(key[:cut + 1])
        training_only |= key[cut + 1:].startswith(ADDED_PREFIX)
    return prefixes.pop() if len(prefixes) == 1 and training_only else None


def split_training_state_dict(
    training_state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a wrapper's state dict into ``(bare, added)``.

    Args:
        training_state_dict: ``MaskedSelfDistill.state_dict()``: keys ``model.*`` and
            ``objectives.*`` only.

    Returns:
        ``bare``: the ``model.*`` entries with the prefix stripped (the bare model's keys);
        ``added``: the ``objectives.*`` entries, keys unchanged (what ``wrapper.added_state_dict()``
        returns).

    Raises:
        ValueError: the dict is not a wrapper state dict (no ``model.*`` key, or keys outside
            both prefixes); the message lists the keys and says what the dict looks like instead.
    """
    state = _check_mapping(training_state_dict, "training_state_dict")
    bare = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    added = {k: v for k, v in state.items() if k.startswith(ADDED_PREFIX)}
    others = [k for k in state if not k.startswith((MODEL_PREFIX, ADDED_PREFIX))]
    if not others and bare:
        return bare, added
    if not state:
        raise ValueError("training_state_dict is empty")
    for wrapper_prefix, how in (
        ("module.", "saved from DistributedDataParallel/DataParallel: save ddp.module.state_dict()"),
        ("_orig_mod.", "saved from a torch.compile'd module: save compiled._orig_mod.state_dict()"),
    ):
        if all(k.startswith(wrapper_prefix) for k in state):
            raise ValueError(
                f"every key of training_state_dict starts with {wrapper_prefix!r} ({how}); strip it "
                f"first with torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "
                f"{wrapper_prefix!r})"
            )
    outer = _outer_prefix(state)
    if outer is not None:
        raise ValueError(
            f"every key of training_state_dict starts with {outer!r} followed by the wrapper's own keys "
            "('model.*', 'objectives.*'): a wrapper saved as an attribute of another module (e.g. a "
            f"LightningModule's checkpoint['state_dict']); strip it first with torch.nn.modules.utils."
            f"consume_prefix_in_state_dict_if_present(state, {outer!r})"
        )
    if not bare and not added:
        raise ValueError(
            f"training_state_dict is not a MaskedSelfDistill state dict (keys 'model.*' and "
            f"'objectives.*'): its keys are {_listing(state)}. It looks like a bare model's state "
            "dict already: load it with bare_model.load_state_dict(state) (or into a wrapper with "
            "wrapper.unwrap().load_state_dict(state))"
        )
    if not bare:
        raise ValueError(
            "training_state_dict holds only training-only entries ('objectives.*', e.g. what "
            "wrapper.added_state_dict() returns) and no bare model ('model.*'): pass the whole "
            "wrapper.state_dict()"
        )
    raise ValueError(
        f"training_state_dict mixes wrapper keys ('model.*', 'objectives.*') with other keys: "
        f"{_listing(others)}; pass exactly what MaskedSelfDistill.state_dict() returned"
    )


def bare_state_dict(training_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The bare model's state dict from a training checkpoint.

    Args:
        training_state_dict: ``MaskedSelfDistill.state_dict()`` (``model.*``, ``objectives.*``).

    Returns:
        ``{key without "model.": tensor}``: what ``wrapper.unwrap().state_dict()`` has; the
        ``objectives.*`` entries (mask tokens, objective heads) are dropped.

    Raises:
        ValueError: not a wrapper state dict (see ``split_training_state_dict``).
    """
    return split_training_state_dict(training_state_dict)[0]


def added_state_dict(training_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The training-only entries (``objectives.*``, keys unchanged) of a training checkpoint.

    ``wrapper.load_added_state_dict(...)`` loads them; they are empty for a wrapper without
    mask tokens (e.g. every branch with ``masking=False``).

    Raises:
        ValueError: not a wrapper state dict (see ``split_training_state_dict``).
    """
    return split_training_state_dict(training_state_dict)[1]


def _is_wrapper(model: object) -> bool:
    """A ``MaskedSelfDistill`` (recognised by its interface: this module is imported by the
    wrapper and must not import it back)."""
    return isinstance(model, nn.Module) and callable(getattr(model, "unwrap", None)) and callable(
        getattr(model, "added_state_dict", None))


def _unwrapped(model: nn.Module, argument: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be an nn.Module, got {type(model).__name__}")
    if _is_wrapper(model):
        return model.unwrap()  # type: ignore[operator]
    for attribute in ("module", "_orig_mod"):  # DistributedDataParallel, torch.compile
        inner = getattr(model, attribute, None)
        if _is_wrapper(inner):
            return inner.unwrap()  # type: ignore[union-attr]
    return model


def load_bare_state_dict(
    bare_model: nn.Module, training_state_dict: Mapping[str, Tensor], strict: bool = True
) -> Any:
    """Load a training checkpoint into the bare model (what inference runs).

    Args:
        bare_model: the bare model (``wrapper.unwrap()``, a ``RISModel``, or your own module for
            ``masksd.wrap``). A ``MaskedSelfDistill`` is unwrapped first.
        training_state_dict: ``MaskedSelfDistill.state_dict()``.
        strict: as in ``nn.Module.load_state_dict``; with True (default), keys the bare model
            lacks or has in addition are a ``ValueError`` listing them.

    Returns:
        ``nn.Module.load_state_dict``'s result (``missing_keys``, ``unexpected_keys``).
    """
    model = _unwrapped(bare_model, "bare_model")
    state = bare_state_dict(training_state_dict)
    if strict:
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"the checkpoint lacks {len(missing)} of the model's keys: {_listing(missing)}")
            if unexpected:
                parts.append(f"it has {len(unexpected)} keys the model lacks: {_listing(unexpected)}")
            raise ValueError(
                f"training_state_dict does not match {type(model).__name__}: " + "; ".join(parts)
                + ". Build the bare model with the configuration the checkpoint was trained with"
            )
    return model.load_state_dict(state, strict=strict)


def open_clip_state_dict(
    training_state_dict: Mapping[str, Tensor],
    model: nn.Module,
    clip: nn.Module,
    *,
    fill_from_clip: Iterable[str] = ("logit_scale", "logit_bias"),
) -> dict[str, Tensor]:
    """The open_clip ``CLIP`` state dict inside a training checkpoint.

    The mapping comes from module identity: every tensor of ``clip.state_dict()`` is looked up
    among the tensors of ``model``'s bare state dict (the towers hold ``clip.visual`` and the
    text modules of ``clip`` themselves), so ``visual.conv1.weight`` is found as
    ``image_tower.visual.conv1.weight``, ``token_embedding.weight`` as
    ``text_tower.token_embedding.weight``, whatever the model calls them.

    Args:
        training_state_dict: ``MaskedSelfDistill.state_dict()`` of the trained model.
        model: a model of the same configuration built on ``clip`` (the wrapper or its bare
            model, e.g. ``MaskedSelfDistill(*towers_from_open_clip(clip), decoder)`` or
            ``masksd.wrap(your_model_holding_clip, spec)``); its weights do not matter.
        clip: the open_clip ``CLIP`` whose modules ``model`` holds.
        fill_from_clip: ``CLIP`` keys the towers do not hold, copied from ``clip`` itself (by
            default the contrastive temperature/bias, which no segmentation model uses).

    Returns:
        ``{CLIP key: tensor}`` with exactly ``clip.state_dict()``'s keys: a fresh ``CLIP`` of
        the same configuration loads it with ``strict=True``. The decoder and the
        ``objectives.*`` entries are not part of the CLIP and are left out.

    Raises:
        ValueError: ``model`` does not share a tensor with ``clip`` (built from another object),
            or a ``CLIP`` key is neither held by the model nor in ``fill_from_clip``, or the
            checkpoint lacks a key the mapping needs.
    """
    bare = bare_state_dict(training_state_dict)
    model = _unwrapped(model, "model")
    if not isinstance(clip, nn.Module):
        raise TypeError(f"clip must be an open_clip CLIP (nn.Module), got {type(clip).__name__}")
    names_in_model: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_in_model.setdefault(id(tensor), []).append(name)
    clip_state = clip.state_dict(keep_vars=True)
    fill = set(fill_from_clip)
    result: dict[str, Tensor] = {}
    not_held: list[str] = []
    absent: list[str] = []
    shared = 0
    for clip_key, tensor in clip_state.items():
        names = names_in_model.get(id(tensor))
        shared += names is not None
        if names is None:
            if clip_key in fill:
                result[clip_key] = tensor.detach().clone()
            else:
                not_held.append(clip_key)
            continue
        found = [name for name in names if name in bare]
        if not found:
            absent.append(f"{clip_key} (model key {names[0]!r})")
            continue
        result[clip_key] = bare[found[0]]
    if shared == 0:
        raise ValueError(
            "model shares no tensor with clip: build it from this clip object "
            "(e.g. towers_from_open_clip(clip)), not from a copy or another CLIP"
        )
    if not_held:
        raise ValueError(
            f"{len(not_held)} keys of clip's state dict are not held by model: {_listing(not_held)}; "
            "the model must be built from this clip's modules (towers_from_open_clip(clip)), or "
            "name the keys to copy from clip unchanged in fill_from_clip"
        )
    if absent:
        raise ValueError(
            f"training_state_dict lacks {len(absent)} entries the CLIP needs: {_listing(absent)}; "
            "was it saved from a model of this configuration?"
        )
    return result


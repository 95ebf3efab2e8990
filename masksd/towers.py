"""The tower contract: what masksd needs from a model, and the bare model built from it.

A *tower* turns one modality's raw input into features in two steps, so that masksd can mask
tokens between them:

``embed(inputs) -> Embedded``
    Raw inputs (images ``[B, 3, H, W]``, token ids ``[B, L]``, anything) to embedded tokens
    ``[B, N, C]`` plus a ``maskable [B, N]`` bool mask (False for padding, special tokens and
    anything that must never be selected or masked). Whatever ``encode`` needs besides the tokens
    (token ids for pooling, the patch grid, ...) goes into ``extras``.
``encode(embedded) -> Encoded``
    Embedded tokens to per-token features ``[B, N_enc, D]`` in the space shared with the other
    tower (used only to *score* tokens), a global feature ``[B, D]`` in that same space, and
    ``features``: whatever the decoder consumes (multi-level maps, word features, masks, ...).

The decoder is any callable ``decoder(image: Encoded, text: Encoded) -> logits`` with logits of
shape ``[B, 1, h, w]`` or ``[B, h, w]``.

Usually ``N_enc == N`` (a ViT's patch tokens line up with its patch embeddings). A tower whose
encoded grid differs from its embedded grid (a CNN stem, a hierarchical backbone) implements
``align_scores(scores [B, N_enc], embedded) -> [B, N]`` to carry correlation scores back onto the
embedded tokens; the default requires the two counts to be equal.

Optional capabilities (used only by the objectives that need them, ``masksd.objectives``; a
model without them still trains with LMVSD/VMLSD, and an objective that needs a missing one
raises a ``TypeError`` naming it on its first training step):

``Embedded.extras["ids"]`` ``[B, L]`` int
    The token ids of the embedded words (labels of ``MaskGrounding``), set by the text tower's
    ``embed``.
``text_tower.word_embedding``
    The input-embedding matrix ``[V, C]`` that ``MaskGrounding`` ties its output layer to: an
    ``nn.Embedding`` or a ``[V, C]`` parameter of the model, or a method returning either.
    Default: the tower's ``token_embedding`` attribute (the open_clip adapter's). It is fetched at
    every step, never copied or registered a second time.
``decoder.forward_with_fused(image, text) -> (logits, fused)``
    The decoder's forward that also returns its fused (vision-language) features, ``[B, D, h, w]``
    or ``[B, N, D]`` or a ``Fused``, from the *same* pass (``LanguageReconstruction``,
    ``CrossModalAlignment(features="fused")``). The tower entry's ``RISModel`` calls it in
    training (``decode_with_fused``); ``decoder(image, text)`` must equal
    ``forward_with_fused(image, text)[0]``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook

from masksd.spec import HookSpec, Maskable, ModalitySpec, Tap

__all__ = [
    "Embedded", "Encoded", "Fused", "Tower", "Decoder", "RISModel", "align_scores", "check_batch_sizes",
    "scoring_tokens", "decoder_foreign_parameters", "decoder_parameters_hidden", "tower_spec",
]

_WRAPPER_PREFIXES = ("model.", "objectives.")  # masksd.checkpoints.MODEL_PREFIX / ADDED_PREFIX


@dataclass
class Embedded:
    """Output of ``Tower.embed``.

    Attributes:
        tokens: ``[B, N, C]`` embedded tokens, the place where masking happens.
        maskable: ``[B, N]`` bool; True where a token may be selected and masked.
        extras: anything ``encode`` needs besides the tokens; passed through unchanged to the
            masked branches.
        grid: ``(h, w)`` with ``h * w == N`` when the tokens lie on a 2-D grid (patches, CNN
            stem positions); needed when the encoded grid differs from this one (see
            ``Encoded.grid``) and by the prediction-guided scorer.
    """

    tokens: Tensor
    maskable: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Tensor) or self.tokens.dim() != 3:
            raise ValueError(
                f"Embedded.tokens must be a [B, N, C] tensor, got "
                f"{_describe(self.tokens)}"
            )
        if not isinstance(self.maskable, Tensor) or self.maskable.dtype != torch.bool:
            raise TypeError(
                f"Embedded.maskable must be a bool tensor, got {_describe(self.maskable)}"
            )
        if tuple(self.maskable.shape) != tuple(self.tokens.shape[:2]):
            raise ValueError(
                f"Embedded.maskable must have shape [B, N] = {tuple(self.tokens.shape[:2])}, "
                f"got {tuple(self.maskable.shape)}"
            )
        _check_grid(self.grid, self.tokens.shape[1], "Embedded")

    def with_tokens(self, tokens: Tensor) -> Embedded:
        """A copy carrying new ``tokens [B, N, C]`` and the same mask and extras."""
        return dataclasses.replace(self, tokens=tokens)


@dataclass
class Encoded:
    """Output of ``Tower.encode``.

    Attributes:
        tokens: ``[B, N_enc, D]`` per-token features in the space shared with the other tower's
            ``global_feature`` (only used to score tokens; never differentiated through the
            score).
        global_feature: ``[B, D]`` sentence / image feature in that shared space.
        features: whatever the decoder consumes; masksd never looks inside.
        grid: ``(h_u, w_u)`` with ``h_u * w_u == N_enc`` when the encoded tokens lie on a
            coarser 2-D grid than the embedded ones (a CNN's last stage over its stem, a
            hierarchical ViT's last stage over its patch embedding). Selection then happens on
            this grid ("units") and the boolean mask is expanded (nearest) onto
            ``Embedded.grid``, so a masked unit is a solid block of embedded positions.
        scoring: optional per-token features ``[B, N_enc, D]`` that the scorers read *instead of*
            ``tokens`` (e.g. dense-alignment features of a CLIP ViT,
            ``masksd.adapters.clip_dense``), or a callable returning them, called at most once,
            when a scorer first needs them (so inference and the masked branches never pay for
            them). None: scorers read ``tokens``. The decoder and the other objectives never
            see it. Read it with ``scoring_tokens(encoded)``.
    """

    tokens: Tensor
    global_feature: Tensor
    features: Any = None
    grid: tuple[int, int] | None = None
    scoring: Tensor | Callable[[], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Tensor) or self.tokens.dim() != 3:
            raise ValueError(
                f"Encoded.tokens must be a [B, N, D] tensor, got {_describe(self.tokens)}"
            )
        if not isinstance(self.global_feature, Tensor) or self.global_feature.dim() != 2:
            raise ValueError(
                "Encoded.global_feature must be a [B, D] tensor, got "
                f"{_describe(self.global_feature)}"
            )
        _check_grid(self.grid, self.tokens.shape[1], "Encoded")
        if self.scoring is not None and not callable(self.scoring):
            _check_scoring(self.scoring, self.tokens)


def _check_scoring(scoring: Any, tokens: Tensor) -> None:
    if (
        not isinstance(scoring, Tensor) or scoring.dim() != 3
        or tuple(scoring.shape[:2]) != tuple(tokens.shape[:2])
    ):
        raise ValueError(
            f"Encoded.scoring must be a [B, N_enc, D] tensor with [B, N_enc] = {tuple(tokens.shape[:2])} "
            f"(one scoring feature per encoded token), got {_describe(scoring)}"
        )


def scoring_tokens(encoded: Encoded) -> Tensor:
    """What the scorers read for ``encoded``'s tokens: ``encoded.scoring`` (a callable is called once
    and its result kept), else ``encoded.tokens``; ``[B, N_enc, D]``."""
    scoring = encoded.scoring
    if scoring is None:
        return encoded.tokens
    if not isinstance(scoring, Tensor):
        scoring = scoring()
        _check_scoring(scoring, encoded.tokens)
        encoded.scoring = scoring
    return scoring


@dataclass
class Fused:
    """The decoder's fused (vision-language) features of the main branch.

    Attributes:
        tokens: ``[B, N, D]`` one feature per position of the decoder's fused map.
        grid: ``(h, w)`` with ``h * w == N`` when the positions lie on a 2-D grid, else None.
    """

    tokens: Tensor
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.tokens, Tensor) or self.tokens.dim() != 3
            or not self.tokens.is_floating_point()
        ):
            raise ValueError(
                f"Fused.tokens must be a floating [B, N, D] tensor, got {_describe(self.tokens)}"
            )
        _check_grid(self.grid, self.tokens.shape[1], "Fused")

    @classmethod
    def from_value(cls, value: Any, where: str) -> Fused:
        """A ``Fused`` from ``[B, D, h, w]`` (grid from the shape), ``[B, N, D]`` (grid when N is a
        perfect square) or a ``Fused``."""
        if isinstance(value, Fused):
            return value
        if isinstance(value, Tensor) and value.dim() == 4:
            grid = (int(value.shape[-2]), int(value.shape[-1]))
            return cls(tokens=rearrange(value, "b d h w -> b (h w) d"), grid=grid)
        if isinstance(value, Tensor) and value.dim() == 3:
            side = math.isqrt(int(value.shape[1]))
            return cls(tokens=value, grid=(side, side) if side * side == value.shape[1] else None)
        raise ValueError(
            f"{where} must give fused features [B, D, h, w] or [B, N, D] (or a masksd.towers.Fused), got "
            f"{_describe(value)}"
        )


@runtime_checkable
class Tower(Protocol):
    """What masksd needs from one modality (see the module docstring)."""

    embed_dim: int

    def embed(self, inputs: Any) -> Embedded: ...

    def encode(self, embedded: Embedded) -> Encoded: ...


class Decoder(Protocol):
    """``decoder(image, text) -> logits [B, 1, h, w]`` (or ``[B, h, w]``)."""

    def __call__(self, image: Encoded, text: Encoded) -> Tensor: ...


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _check_grid(grid: Any, count: int, owner: str) -> None:
    if grid is None:
        return
    if (
        not isinstance(grid, tuple)
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
    ):
        raise TypeError(f"{owner}.grid must be a tuple of two positive ints (h, w), got {grid!r}")
    if grid[0] * grid[1] != count:
        raise ValueError(
            f"{owner}.grid {grid} holds {grid[0] * grid[1]} positions but there are {count} tokens"
        )


def _check_tower(tower: Any, argument: str) -> None:
    if not isinstance(tower, nn.Module):
        raise TypeError(
            f"{argument} must be a torch.nn.Module (so that its parameters are trained and "
            f"saved), got {type(tower).__name__}"
        )
    missing = [name for name in ("embed", "encode") if not callable(getattr(tower, name, None))]
    if missing:
        raise TypeError(f"{argument} must define {' and '.join(missing)}(); see masksd.towers")
    embed_dim = getattr(tower, "embed_dim", None)
    if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim <= 0:
        raise TypeError(
            f"{argument}.embed_dim must be a positive int (the width C of its embedded "
            f"tokens), got {embed_dim!r}"
        )


def check_batch_sizes(images: int, texts: int) -> None:
    """Refuse image and text batches of different sizes (shapes only: no device sync).

    Args:
        images: ``B`` of the image tokens ``[B, N, C]``.
        texts: ``B`` of the text tokens ``[B, L, C]``.
    """
    if int(images) != int(texts):
        raise ValueError(
            f"images and texts have different batch sizes ({int(images)} vs {int(texts)}); "
            "give one sentence per image (repeat an image for each of its sentences)"
        )


def _refuse_training_state_dict(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """``load_state_dict`` pre-hook of ``RISModel``: refuse a wrapper's state dict.

    With ``strict=False`` such a dict would load nothing (every key "unexpected"), silently.
    """
    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    if keys and all(k.startswith(_WRAPPER_PREFIXES) for k in keys):
        where = f" under {prefix!r}" if prefix else ""
        raise ValueError(
            f"state_dict{where} is a MaskedSelfDistill training state dict (every key starts with "
            f"'model.' or 'objectives.', e.g. {keys[0]!r}), not a RISModel's: loading it would load "
            "nothing (with strict=False, silently). Use "
            "masksd.checkpoints.load_bare_state_dict(bare_model, state_dict), or "
            "bare_model.load_state_dict(masksd.checkpoints.bare_state_dict(state_dict))"
        )


def align_scores(tower: Any, scores: Tensor, embedded: Embedded) -> Tensor:
    """Map scores over encoded tokens ``[B, N_enc]`` onto embedded tokens ``[B, N]``.

    Uses ``tower.align_scores`` when the tower defines it; otherwise the counts must match.
    """
    custom = getattr(tower, "align_scores", None)
    if callable(custom):
        scores = custom(scores, embedded)
    if tuple(scores.shape) != tuple(embedded.maskable.shape):
        raise ValueError(
            f"{type(tower).__name__}: encoded tokens give scores of shape "
            f"{tuple(scores.shape)} but the embedded tokens have shape "
            f"{tuple(embedded.maskable.shape)}; define align_scores(scores, embedded) on the "
            "tower to map one onto the other"
        )
    return scores


class RISModel(nn.Module):
    """The bare model: ``decoder(image_tower.encode(embed(x)), text_tower.encode(embed(t)))``.

    This is exactly what ``MaskedSelfDistill`` runs at inference, and what ``unwrap()`` returns.
    ``load_state_dict`` refuses a wrapper's state dict (keys ``model.*`` / ``objectives.*``) with a
    ``ValueError`` pointing to ``masksd.checkpoints.load_bare_state_dict``.

    Args:
        image_tower: a ``Tower`` for images (an ``nn.Module``).
        text_tower: a ``Tower`` for text (an ``nn.Module``).
        decoder: ``decoder(image: Encoded, text: Encoded) -> logits``; an ``nn.Module`` if it has
            parameters.
        decode_with_fused: in training, call ``decoder.forward_with_fused`` (when defined) instead
            of the decoder, for masksd's objectives that read the fused features (``tower_spec``).
    """

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, decoder: Decoder, *,
                 decode_with_fused: bool = False) -> None:
        super().__init__()
        self.decode_with_fused = decode_with_fused and callable(getattr(decoder, "forward_with_fused", None))
        _check_tower(image_tower, "image_tower")
        _check_tower(text_tower, "text_tower")
        if not callable(decoder):
            raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.decoder = decoder
        # public from torch 2.5 (pytorch/pytorch#131690); the private one, with the module, before
        if hasattr(nn.Module, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_refuse_training_state_dict)
        else:  # pragma: no cover - torch < 2.5
            self._register_load_state_dict_pre_hook(_refuse_training_state_dict, with_module=True)

        self.sites = nn.ModuleDict({name: CallSite() for name in SITES})

    def encode(self, images: Any, texts: Any) -> tuple[Encoded, Encoded]:
        """Embed and encode both modalities (the main branch without the decoder)."""
        return self._tower_pass("image", images), self._tower_pass("text", texts)

    def _tower_pass(self, modality: str, inputs: Any) -> Encoded:
        embedded = self.sites[f"{modality}_embed"](self._embed, modality, inputs)
        return self.sites[f"{modality}_encode"](self._encode, modality, embedded)

    def _embed(self, modality: str, inputs: Any) -> Embedded:
        embedded = self._call_tower(modality, "embed", inputs, Embedded, "tokens=..., maskable=...")
        tower = getattr(self, f"{modality}_tower")
        if embedded.tokens.shape[-1] != tower.embed_dim:
            raise ValueError(
                f"{modality}_tower.embed_dim is {tower.embed_dim} but its embed() returns tokens of width "
                f"{embedded.tokens.shape[-1]} (shape {tuple(embedded.tokens.shape)}); set embed_dim to the "
                "width of the embedded tokens (the mask token has that size)"
            )
        return embedded

    def _encode(self, modality: str, embedded: Embedded) -> Encoded:
        fields = "tokens=..., global_feature=..., features=..."
        return self._call_tower(modality, "encode", embedded, Encoded, fields)

    def _call_tower(self, modality: str, method: str, value: Any, kind: type, fields: str) -> Any:
        """``<modality>_tower.<method>(value)``, refused unless it returns a ``kind`` record."""
        tower = getattr(self, f"{modality}_tower")
        result = getattr(tower, method)(value)
        if not isinstance(result, kind):
            raise TypeError(
                f"{modality}_tower ({type(tower).__name__}).{method} must return "
                f"masksd.towers.{kind.__name__}({fields}), got {type(result).__name__}"
            )
        return result

    def _decode_with_fused(self, image: Encoded, text: Encoded) -> tuple[Tensor, Fused]:
        name = f"decoder ({type(self.decoder).__name__}).forward_with_fused"
        result = self.decoder.forward_with_fused(image, text)  # type: ignore[union-attr]
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError(f"{name} must return (logits, fused), got {type(result).__name__}")
        return _logits(result[0], name), Fused.from_value(result[1], name)

    def forward(self, images: Any, texts: Any) -> Tensor:
        """Segmentation logits ``[B, 1, h, w]`` (or whatever shape the decoder returns).

        With ``decode_with_fused`` (the tower entry sets it), a training forward calls the
        decoder's ``forward_with_fused`` (same logits, by the contract), so that masksd reads the
        fused features of the one decoder pass; otherwise the decoder is called as a module.

        Raises:
            ValueError: the image and text batch sizes differ (``Encoded.tokens.shape[0]``).
        """
        image, text = self.encode(images, texts)
        check_batch_sizes(image.tokens.shape[0], text.tokens.shape[0])
        if self.training and self.decode_with_fused:
            return self.sites["decode"](self._decode_with_fused, image, text)[0]
        return _logits(
            self.sites["decode"](self.decoder, image, text), f"decoder ({type(self.decoder).__name__})"
        )


SITES = ("image_embed", "image_encode", "text_embed", "text_encode", "decode")


class CallSite(nn.Module):
    """A parameter-free call site of ``RISModel``: ``site(fn, *args)`` returns ``fn(*args)``.

    A tower's ``embed`` and ``encode`` are methods, not module calls; calling them through a site
    gives masksd's hooks a module to attach to (``tower_spec``). No parameters, no state: the bare
    model's ``state_dict()`` keys are the towers' and the decoder's.
    """

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def _logits(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must return a logits tensor [B, 1, h, w], got {type(value).__name__}; "
            "return the segmentation logits only"
        )
    return value


def _module_path(model: nn.Module, value: Any) -> str | None:
    """The path of ``value`` (a module or a parameter) on ``model``, or None."""
    if isinstance(value, nn.Module):
        return next((name for name, m in model.named_modules() if m is value), None)
    return next((name for name, p in model.named_parameters() if p is value), None)


def tower_spec(model: RISModel) -> HookSpec:
    """The ``HookSpec`` of a ``RISModel``: the tower entry is this spec on the hook engine.

    Each tower's ``embed`` and ``encode`` run through ``model.sites`` (``CallSite``); the embed
    sites give the ``Embedded`` records masksd masks, the encode sites the ``Encoded`` scoring
    features, and both are reused (skipped) in the branch that masks the other modality: late
    fusion by construction. A decoder with ``forward_with_fused`` gives ``fused``; the text tower's
    ``special_ids`` (the open_clip adapter's) become ``Maskable.never`` on the ``texts`` argument,
    its ``word_embedding`` (or ``token_embedding``) the matrix objectives tie to.
    """
    text = model.text_tower
    special = getattr(text, "special_ids", ())
    never = tuple(int(i) for i in special) if isinstance(special, (tuple, list)) else ()
    table = getattr(text, "word_embedding", None)
    if table is None:
        table = getattr(text, "token_embedding", None)
    elif callable(table) and not isinstance(table, nn.Module):
        table = table()
    table_path = _module_path(model, table) if table is not None else None

    def part(modality: str, **options: Any) -> ModalitySpec:
        embed, encode = f"sites.{modality}_embed", f"sites.{modality}_encode"
        return ModalitySpec(embed=embed, width=getattr(model, f"{modality}_tower").embed_dim,
                            tokens=Tap(encode), reuse=(embed, encode), **options)

    fused = model.decode_with_fused
    return HookSpec(
        image=part("image", argument="images"),
        text=part("text", argument="texts", word_embedding=table_path,
                  maskable=Maskable(ids="texts", never=never) if never else Maskable()),
        fusion="late",
        fused=Tap("sites.decode", select="[1]") if fused else None,
        decoder="decoder" if isinstance(model.decoder, nn.Module) else None,
    )


def decoder_parameters_hidden(decoder: Any) -> list[str]:
    """Names of ``nn.Module``/``nn.Parameter`` objects a plain-function decoder reaches.

    A function or lambda that calls the user's neck and head keeps their parameters out of the
    wrapper's ``parameters()`` and ``state_dict()``: no gradient step, no checkpoint.
    """
    if isinstance(decoder, nn.Module):
        return []
    found: list[str] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, nn.Module) and any(True for _ in value.parameters()):
            found.append(f"{name} ({type(value).__name__})")
        elif isinstance(value, nn.Parameter):
            found.append(f"{name} (Parameter)")

    target = getattr(decoder, "__func__", decoder)
    owner = getattr(decoder, "__self__", None)
    if owner is not None:
        visit("self", owner)
    for arg in getattr(decoder, "args", ()) or ():  # functools.partial
        visit("partial argument", arg)
    for key, arg in (getattr(decoder, "keywords", None) or {}).items():
        visit(f"partial keyword {key}", arg)
    code = getattr(target, "__code__", None)
    if code is not None:
        for cell_name, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or ()):
            try:
                visit(cell_name, cell.cell_contents)
            except ValueError:  # empty cell
                continue
        module_globals = getattr(target, "__globals__", {})
        for global_name in code.co_names:
            if global_name in module_globals:
                visit(global_name, module_globals[global_name])
        for default in getattr(target, "__defaults__", None) or ():
            visit("default argument", default)
    return found


class ForeignParameters:
    """What ran in a decoder call with trainable parameters outside the bare model.

    Attributes:
        modules: outermost modules (not the bare model's) with such parameters that ran.
        parameters: further such ``nn.Parameter`` objects the logits depend on (used without a
            module call, e.g. ``F.linear(x, head["w"])``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._own_modules = {id(m) for m in model.modules()}
        self._own_parameters = {id(p) for p in model.parameters()}
        self._thread = threading.get_ident()
        self.modules: list[nn.Module] = []
        self.parameters: list[nn.Parameter] = []

    def _foreign(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad and id(p) not in self._own_parameters]

    def record(self, module: nn.Module, args: Any) -> None:
        """Global forward pre-hook: note ``module`` if it is foreign (outermost call only)."""
        if threading.get_ident() != self._thread or id(module) in self._own_modules:
            return
        if any(module is inner for found in self.modules for inner in found.modules()):
            return
        if self._foreign(module):
            self.modules.append(module)

    def add_graph(self, logits: Tensor) -> None:
        """Add the foreign ``nn.Parameter`` leaves of the autograd graph of ``logits [B, 1, h, w]``
        that no recorded module holds (one walk over the graph)."""
        covered = {id(p) for module in self.modules for p in module.parameters()}
        seen: set[Any] = set()
        stack = [logits.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if (
                isinstance(variable, nn.Parameter)
                and id(variable) not in self._own_parameters
                and id(variable) not in covered
            ):
                covered.add(id(variable))
                self.parameters.append(variable)
            stack.extend(next_node for next_node, _ in node.next_functions)

    def refuse(self, decoder: Any) -> None:
        """Raise the ``ValueError`` that names what was found (nothing found: return)."""
        found = [f"{type(m).__name__} ({sum(p.numel() for p in self._foreign(m)):,} parameters)"
                 for m in self.modules]
        found += [f"an nn.Parameter of shape {list(p.shape)} ({p.numel():,} values)" for p in self.parameters]
        if not found:
            return
        name = getattr(decoder, "__qualname__", None) or type(decoder).__name__
        raise ValueError(
            f"decoder ({name}) uses trainable parameters that are not part of the wrapper: "
            f"{', '.join(found)}. They would be neither trained (wrapper.parameters()) nor saved "
            "(wrapper.state_dict()). Pass an nn.Module as decoder: wrap the callable in an nn.Module "
            "that holds them as submodules (a dict or list of modules hides them: use nn.ModuleDict / "
            "nn.ModuleList, and nn.Parameter attributes or nn.ParameterDict for raw parameters)"
        )


@contextmanager
def decoder_foreign_parameters(model: nn.Module) -> Iterator[ForeignParameters]:
    """Record, while the block runs, the modules outside ``model`` with trainable parameters.

    A process-wide forward pre-hook (``register_module_forward_pre_hook``) is installed for the
    block only (it records calls from this thread); call ``add_graph(logits)`` inside the block
    for raw parameters and ``refuse(decoder)`` after it. Frozen modules (no parameter with
    ``requires_grad``) are allowed: a fixed pretrained helper loaded by your own code.
    """
    found = ForeignParameters(model)
    handle = register_module_forward_pre_hook(found.record)
    try:
        yield found
    finally:
        handle.remove()

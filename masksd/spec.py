"""How masksd finds its way around an unchanged model: ``HookSpec`` and its parts.

A spec names places on the *bare* model (module paths as in ``model.named_modules()``) and
selectors on values (a tiny, safe subset of Python subscripts: ``"[0]"``, ``"['pred']"``,
``".last_hidden_state"``, ``"[:, 1:]"``, ``"[1].global_feature"``). Everything is a plain
string, number or tuple, so a spec serialises to a dict (``to_dict`` / ``from_dict``) and can
be stored in a checkpoint. Callables are accepted where a string cannot say it (a custom
``maskable``); they serialise as ``"module:qualname"`` and must then be importable.

Example (a late-fusion CLIP model whose ``forward(img, ids)`` returns logits)::

    spec = HookSpec(
        image=ModalitySpec(embed="backbone.visual.conv1", layout="bchw",
                           tokens=Tap("neck", kind="input", select="[0]", layout="bchw"),
                           reuse=("backbone.visual",)),
        text=ModalitySpec(embed="backbone.token_embedding", layout="bnc",
                          maskable=Maskable(ids="ids", never=(0, 49406, 49407)),
                          tokens=Tap("backbone.ln_final", project="backbone.text_projection"),
                          reuse=("backbone.transformer",)),
    )
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from masksd.layouts import LAYOUTS, Layout

__all__ = ["HookSpec", "Maskable", "ModalitySpec", "Output", "Tap", "apply_selector"]

Fusion = Literal["auto", "late", "text->image", "image->text", "bidirectional"]
FUSIONS = ("auto", "late", "text->image", "image->text", "bidirectional")


# ----------------------------------------------------------------------------------- selectors
def _parse_selector(select: str) -> ast.expr:
    """Parse ``select`` as ``x<select>`` and allow only subscripts, slices and attributes."""
    try:
        tree = ast.parse("x" + select, mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"select {select!r} is not a valid selector ({error.msg})") from None

    def allowed(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id == "x"
        if isinstance(node, ast.Attribute):
            return not node.attr.startswith("_") and allowed(node.value)
        if isinstance(node, ast.Subscript):
            return allowed(node.value) and index_ok(node.slice)
        return False

    def index_ok(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, str)) or node.value is None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, int)
        if isinstance(node, ast.Slice):
            return all(part is None or index_ok(part) for part in (node.lower, node.upper, node.step))
        if isinstance(node, ast.Tuple):
            return all(index_ok(item) for item in node.elts)
        return False

    if not allowed(tree):
        raise ValueError(
            f"select {select!r} may only hold subscripts ([0], ['key'], [:, 1:]) and public "
            "attributes (.name), e.g. \"[0]\" or \"['pred_masks']\""
        )
    return tree


def apply_selector(value: Any, select: str, *, where: str = "value") -> Any:
    """Apply a selector string such as ``"[0]"`` or ``"['logits'][:, 1:]"`` to ``value``."""
    if not select:
        return value
    code = _compiled(select)
    try:
        return eval(code, {"__builtins__": {}}, {"x": value})  # noqa: S307 - parsed and restricted above
    except (IndexError, KeyError, AttributeError, TypeError) as error:
        raise ValueError(
            f"select {select!r} failed on {where} ({_describe(value)}): {type(error).__name__}: {error}"
        ) from None


@functools.lru_cache(maxsize=256)
def _compiled(select: str) -> Any:
    """``select`` parsed, checked and compiled once (a spec's selectors run at every step)."""
    return compile(ast.Expression(_parse_selector(select)), "<masksd selector>", "eval")


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)[:8]}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


# ------------------------------------------------------------------------------- serialising
def _callable_to_str(fn: Callable[..., Any], argument: str) -> str:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not qualname or "<" in qualname:
        raise ValueError(
            f"{argument}: {fn!r} cannot be serialised (a lambda or a local function); use a "
            "module-level function so that the spec can be saved and loaded"
        )
    return f"{module}:{qualname}"


def _callable_from_str(path: str) -> Callable[..., Any]:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _check_choice(value: Any, choices: tuple[str, ...], argument: str) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")


# -------------------------------------------------------------------------------------- parts
@dataclass(frozen=True, kw_only=True)
class Output:
    """The model's return value, optionally narrowed by ``select`` (e.g. ``"[0]"``)."""

    select: str = ""

    def __post_init__(self) -> None:
        if self.select:
            _parse_selector(self.select)


@dataclass(frozen=True)
class Tap:
    """A value captured from one module call during the forward.

    Attributes:
        module: path of the module on the bare model (``""`` is the model itself).
        kind: ``"output"`` (what the module returned) or ``"input"`` (its positional arguments,
            as a tuple: select with ``"[0]"``).
        select: selector applied to the captured value.
        call: which call when the module runs more than once per forward (0-based; negative
            counts from the end). None requires exactly one call.
        layout: for token features: ``"bnc"`` ``[B, N, D]``, ``"bchw"`` ``[B, D, h, w]``,
            ``"nbc"`` ``[N, B, D]`` or ``"bcn"`` ``[B, D, N]`` (Conv1d outputs such as LAVT's
            PWAM ``f_query``). Ignored for global features and logits.
        project: optional path of a parameter ``P [D_in, D]`` (applied as ``x @ P``) or of a
            module (applied as ``module(x)``) that maps the value into the shared scoring space,
            e.g. CLIP's ``text_projection``; a tuple applies several in order (after the layout
            is turned into ``[B, N, D]``), e.g. MaskCLIP's dense tokens of a CLIP ResNet:
            ``("visual.attnpool.v_proj", "visual.attnpool.c_proj")``. A step
            ``"clip_dense:<mode>:<P>:<block path>"`` recomputes a CLIP ViT block's attention branch
            from its tapped input (MaskCLIP / ClearCLIP; ``masksd.adapters.clip_dense.clip_dense_tap``).
    """

    module: str
    kind: Literal["output", "input"] = "output"
    select: str = ""
    call: int | None = None
    layout: Layout = "bnc"
    project: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.project, list):
            object.__setattr__(self, "project", tuple(self.project))
        if not isinstance(self.module, str):
            raise TypeError(f"Tap.module must be a module path string, got {type(self.module).__name__}")
        _check_choice(self.kind, ("output", "input"), "Tap.kind")
        _check_choice(self.layout, LAYOUTS, "Tap.layout")
        if self.select:
            _parse_selector(self.select)


@dataclass(frozen=True, kw_only=True)
class Maskable:
    """Which embedded tokens may be selected and masked.

    Attributes:
        ids: name of the model's forward argument holding token ids ``[B, L]``; positions whose
            id is in ``never`` are not maskable (padding, SOT/EOT, [CLS]/[SEP]).
        never: token ids that are never maskable.
        attention_mask: name of the forward argument holding a ``[B, L]`` attention mask
            (1 = real token); positions with 0 are not maskable.
        fn: a callable ``fn(arguments: dict[str, Any]) -> [B, N] bool`` receiving the forward's
            bound arguments by name, for anything else.
    With nothing set, every token is maskable (the default for images).
    """

    ids: str | None = None
    never: tuple[int, ...] = ()
    attention_mask: str | None = None
    fn: Callable[[dict[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "never", tuple(int(v) for v in self.never))
        if self.fn is not None and not callable(self.fn):
            raise TypeError(f"Maskable.fn must be callable, got {type(self.fn).__name__}")
        if self.never and self.ids is None:
            raise ValueError("Maskable.never needs ids= (the forward argument holding the token ids)")


MaskTokenInit = str  # "learned" | "zero" | "embedding:<module path>:<row>"


@dataclass(frozen=True, kw_only=True)
class ModalitySpec:
    """One modality of an unchanged model.

    Attributes:
        embed: path of the module whose *output* is the embedded tokens (patch/stem
            embedding, word embeddings); masking replaces positions of that output.
        layout: that output's layout: ``"bchw"`` (a conv stem), ``"bnc"``, ``"nbc"`` or ``"bcn"``.
        call: which call of ``embed`` when it runs more than once per forward; None requires
            exactly one call.
        grid: ``(h, w)`` of ``bnc``/``nbc`` image embeddings when it cannot be inferred (a
            non-square token count).
        maskable: which positions may be masked (see ``Maskable``).
        tokens: per-token scoring features in the space shared with the other modality's
            global feature (a ``Tap``); None when no scorer needs them.
        global_: global scoring feature ``[B, D]`` (a ``Tap``); None = mean of ``tokens``
            (over maskable positions when tokens and embeddings line up).
        reuse: module paths (``fnmatch`` patterns allowed, e.g. ``"visual.blocks.*"``) whose
            outputs do not depend on the *other* modality's tokens, so that when the other
            modality is masked they are skipped and their main-branch outputs reused. Checked
            by the fusion probe unless ``HookSpec.fusion`` is given.
        mask_token: ``"learned"`` (``N(0, 0.02²)``, the paper), ``"zero"`` (learned, from 0)
            or ``"embedding:<module path>:<row>"`` (e.g. BERT's ``[MASK]`` row:
            ``"embedding:text_encoder.embeddings.word_embeddings:103"``).
        width: width C of the embedded tokens when it cannot be read off the embed module.
        argument: name of the model's forward argument that carries this modality's raw input
            (the image tensor ``[B, 3, H, W]``; the token ids ``[B, L]``, default
            ``maskable.ids``). masksd checks the batch sizes of both modalities against each
            other before the model runs, and input-space objectives (``MaskRIS``) corrupt it.
        word_embedding: path of the input-embedding matrix ``[V, C]`` (an ``nn.Embedding`` or a
            parameter) that objectives tie to (``MaskGrounding``, ``MaskRIS`` in embedding mode);
            None: the ``embed`` module itself when it is an ``nn.Embedding``.
        units: ``(h_u, w_u)`` grid on which image tokens are selected and masked when no
            scoring tap gives one (e.g. a CNN's or Swin's last-stage grid over a stride-4
            stem, for ``scorer="prediction"`` or ``"random"``); masked units become solid blocks
            of the embedded grid. None: the scoring tokens' grid, else the embedded grid.
    """

    embed: str
    layout: Layout = "bnc"
    call: int | None = None
    grid: tuple[int, int] | None = None
    maskable: Maskable = field(default_factory=Maskable)
    tokens: Tap | None = None
    global_: Tap | None = None
    reuse: tuple[str, ...] = ()
    mask_token: MaskTokenInit = "learned"
    width: int | None = None
    argument: str | None = None
    word_embedding: str | None = None
    units: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.embed, str) or not self.embed:
            raise TypeError(f"ModalitySpec.embed must be a module path string, got {self.embed!r}")
        _check_choice(self.layout, LAYOUTS, "ModalitySpec.layout")
        if isinstance(self.reuse, str):
            object.__setattr__(self, "reuse", (self.reuse,))
        object.__setattr__(self, "reuse", tuple(self.reuse))
        for name in ("grid", "units"):
            value = getattr(self, name)
            if value is not None:
                if len(tuple(value)) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
                    raise ValueError(
                        f"ModalitySpec.{name} must be a pair of positive ints (h, w), got {value!r}"
                    )
                object.__setattr__(self, name, tuple(value))
        if self.argument is not None and (not isinstance(self.argument, str) or not self.argument):
            raise TypeError(f"ModalitySpec.argument must be a forward argument name, got {self.argument!r}")
        for name in ("tokens", "global_"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tap):
                raise TypeError(f"ModalitySpec.{name} must be a Tap or None, got {type(value).__name__}")
        if not isinstance(self.maskable, Maskable):
            raise TypeError(f"ModalitySpec.maskable must be a Maskable, got {type(self.maskable).__name__}")
        init = self.mask_token
        if not (init in ("learned", "zero") or (isinstance(init, str) and init.startswith("embedding:"))):
            raise ValueError(
                "ModalitySpec.mask_token must be 'learned', 'zero' or 'embedding:<module path>:<row>', "
                f"got {init!r}"
            )


@dataclass(frozen=True, kw_only=True)
class HookSpec:
    """Everything masksd needs to know about an unchanged model (see the module docstring).

    Attributes:
        image / text: the two modalities; either may be None when that branch is disabled.
        logits: where the segmentation logits come from: ``Output(select=...)`` on the model's
            return value, or a module ``Tap`` (use a tap when the training forward returns a
            loss or detached predictions).
        two_class: logits are ``[B, 2, h, w]`` (softmax over background/foreground); masksd
            uses ``x[:, 1] - x[:, 0]``, for which ``sigmoid`` equals the softmax's foreground
            probability.
        target: name of the model's forward argument that carries the ground-truth mask
            (models that compute their loss in ``forward``); None = pass ``target=`` to the
            wrapper and the model never sees it.
        loss: selector on the model's return value giving its own training loss, used as the
            main segmentation term instead of masksd's BCE: a scalar tensor, or a dict read with
            mmseg's ``parse_losses`` convention (only entries whose key contains ``"loss"`` are
            summed; metrics such as ``acc_seg`` are ignored; see
            ``masksd.engine.outputs.as_tensor_loss``); ``""`` = the whole return value (detectron2
            and mmseg models return their loss dict); None = masksd's BCE on the logits.
        fusion: ``"auto"`` probes once whether each modality's ``reuse`` outputs depend on the
            other modality; or say it: ``"late"``, ``"text->image"`` (the image backbone
            consumes the sentence, LAVT), ``"image->text"``, ``"bidirectional"``.
        fused: optional ``Tap`` on the decoder's fused (vision-language) features, read from the
            main branch's one forward (``bchw`` ``[B, D, h, w]``, ``bnc`` or ``nbc``), for the
            objectives that need them (``LanguageReconstruction``,
            ``CrossModalAlignment(features="fused")``); None when no objective needs them.
        decoder: path of the decoder module, for ``DistillConfig(share_decoder=False)`` (paper
            Table VII): each branch gets its own copy, swapped in for that branch's forward.
    """

    image: ModalitySpec | None = None
    text: ModalitySpec | None = None
    logits: Output | Tap = field(default_factory=Output)
    two_class: bool = False
    target: str | None = None
    loss: str | None = None
    fusion: Fusion = "auto"
    fused: Tap | None = None
    decoder: str | None = None

    def __post_init__(self) -> None:
        if self.decoder is not None and (not isinstance(self.decoder, str) or not self.decoder):
            raise TypeError(f"HookSpec.decoder must be a module path string, got {self.decoder!r}")
        for name in ("image", "text"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, ModalitySpec):
                raise TypeError(f"HookSpec.{name} must be a ModalitySpec or None, got {type(value).__name__}")
        if self.fused is not None and not isinstance(self.fused, Tap):
            raise TypeError(f"HookSpec.fused must be a Tap or None, got {type(self.fused).__name__}")
        if not isinstance(self.logits, (Output, Tap)):
            raise TypeError(
                f"HookSpec.logits must be Output(...) or Tap(...), got {type(self.logits).__name__}"
            )
        _check_choice(self.fusion, FUSIONS, "HookSpec.fusion")
        if self.loss is not None:
            _parse_selector(self.loss)

    def modality(self, name: str) -> ModalitySpec:
        """The spec of ``"image"`` or ``"text"`` (ValueError when it is missing)."""
        spec = getattr(self, name)
        if spec is None:
            raise ValueError(f"HookSpec.{name} is None, so the branch that masks {name} tokens cannot run")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (strings, numbers, lists, None) that ``from_dict`` turns back into this spec."""
        def encode(value: Any, path: str) -> Any:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                out = {"__type__": type(value).__name__}
                for f in dataclasses.fields(value):
                    out[f.name] = encode(getattr(value, f.name), f"{path}.{f.name}")
                return out
            if isinstance(value, tuple):
                return [encode(v, path) for v in value]
            if callable(value):
                return {"__callable__": _callable_to_str(value, path)}
            return value

        return encode(self, "spec")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HookSpec:
        """Inverse of ``to_dict``."""
        types = {t.__name__: t for t in (HookSpec, ModalitySpec, Maskable, Tap, Output)}

        def decode(value: Any) -> Any:
            if isinstance(value, Mapping) and "__callable__" in value:
                return _callable_from_str(value["__callable__"])
            if isinstance(value, Mapping) and "__type__" in value:
                kind = types.get(value["__type__"])
                if kind is None:
                    raise ValueError(f"unknown spec part {value['__type__']!r}")
                kwargs = {k: decode(v) for k, v in value.items() if k != "__type__"}
                for key in ("never", "reuse", "grid", "units"):
                    if isinstance(kwargs.get(key), list):
                        kwargs[key] = tuple(kwargs[key])
                if kind is Tap:
                    return Tap(kwargs.pop("module"), **kwargs)
                return kind(**kwargs)
            return value

        spec = decode(dict(data))
        if not isinstance(spec, HookSpec):
            raise ValueError("data is not a serialised HookSpec (missing '__type__': 'HookSpec')")
        return spec
